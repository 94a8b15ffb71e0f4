//! Forward + backward of one loss on burn's wgpu autodiff device, timed on the host to
//! completion (`Device::sync`): `bench_burn xent|burn ROWS CLASSES ITERS`. One loss per
//! process, so that the device memory it reports is its own: burn's pool reserve after
//! the steps (its peak, since pools keep pages), plus xent's workspace.

use std::time::Instant;

use burn::tensor::{Distribution, Int, Tensor};
use xent::LossOptions;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map_or("xent", String::as_str).to_string();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n, v, iters) = (num(2, 256), num(3, 32000), num(4, 10));
    let device = xent_burn::init_wgpu(Default::default()).expect("a wgpu adapter").autodiff();
    let base = Tensor::<2>::random([n, v], Distribution::Normal(0.0, 2.0), &device);
    let targets = Tensor::<1, Int>::random([n], Distribution::Uniform(0.0, v as f64), &device);
    device.sync().unwrap();
    let burn_loss = burn::nn::loss::CrossEntropyLossConfig::new().init(&device);
    let mut times = Vec::new();
    for _ in 0..=iters {
        let start = Instant::now();
        let logits = base.clone().require_grad();
        let loss = if which == "burn" {
            burn_loss.forward(logits.clone(), targets.clone())
        } else {
            xent_burn::cross_entropy(logits.clone(), targets.clone(), &LossOptions::new())
        };
        let grads = loss.backward();
        let g = logits.grad(&grads).expect("a gradient");
        drop(g);
        device.sync().unwrap();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let first = times[0];
    let mut rest = times[1..].to_vec();
    rest.sort_by(f64::total_cmp);
    let reserved = device.memory_pool_usage().map_or(0, |u| u.bytes_reserved);
    let xent = xent_burn::xent_device_bytes(&device).unwrap_or(0);
    println!(
        "{{\"loss\": \"{which}\", \"rows\": {n}, \"classes\": {v}, \"first_ms\": {first:.1}, \"median_ms\": {:.2}, \
         \"min_ms\": {:.2}, \"burn_reserved_mib\": {:.1}, \"xent_mib\": {:.1}}}",
        rest[rest.len() / 2],
        rest[0],
        reserved as f64 / (1 << 20) as f64,
        xent as f64 / (1 << 20) as f64
    );
}
