//! Forward + backward of one loss on burn's wgpu autodiff device, timed on the host to
//! completion (`Device::sync`): `bench_burn xent|burn ROWS CLASSES ITERS` (the loss of
//! given logits), or `bench_burn xent-linear|burn-linear ROWS HIDDEN CLASSES ITERS` (the
//! LM head: `xent_burn::linear_cross_entropy`, or burn's `Linear` product + bias and
//! `CrossEntropyLoss`; gradients of h, W and b). One loss per process, so that the device
//! memory it reports is its own: burn's pool reserve after the steps (its peak, since
//! pools keep pages), plus xent's workspace.

use std::time::Instant;

use burn::tensor::{Distribution, Int, Tensor};
use xent::LossOptions;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map_or("xent", String::as_str).to_string();
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let linear = which.ends_with("-linear");
    let (n, d, v, iters) = if linear {
        (num(2, 512), num(3, 1024), num(4, 32000), num(5, 3))
    } else {
        (num(2, 256), 0, num(3, 32000), num(4, 10))
    };
    let device = xent_burn::init_wgpu(Default::default()).expect("a wgpu adapter").autodiff();
    if linear {
        return head(&which, n, d, v, iters, &device);
    }
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
    report(&which, n, None, v, &times, &device);
}

/// The LM head's forward + backward: `which` is `xent-linear` or `burn-linear`.
fn head(which: &str, n: usize, d: usize, v: usize, iters: usize, device: &burn::tensor::Device) {
    let h = Tensor::<2>::random([n, d], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<2>::random([v, d], Distribution::Normal(0.0, 0.05), device);
    let b = Tensor::<1>::random([v], Distribution::Normal(0.0, 0.1), device);
    let targets = Tensor::<1, Int>::random([n], Distribution::Uniform(0.0, v as f64), device);
    device.sync().unwrap();
    let burn_loss = burn::nn::loss::CrossEntropyLossConfig::new().init(device);
    let mut times = Vec::new();
    for _ in 0..=iters {
        let start = Instant::now();
        let (hh, ww, bb) = (h.clone().require_grad(), w.clone().require_grad(), b.clone().require_grad());
        let loss = if which == "burn-linear" {
            let logits = hh.clone().matmul(ww.clone().transpose()) + bb.clone().unsqueeze_dim(0);
            burn_loss.forward(logits, targets.clone())
        } else {
            xent_burn::linear_cross_entropy(
                hh.clone(),
                ww.clone(),
                Some(bb.clone()),
                targets.clone(),
                &LossOptions::new(),
            )
        };
        let grads = loss.backward();
        let g = (hh.grad(&grads).expect("dh"), ww.grad(&grads).expect("dW"), bb.grad(&grads).expect("db"));
        drop(g);
        device.sync().unwrap();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    report(which, n, Some(d), v, &times, device);
}

fn report(which: &str, n: usize, d: Option<usize>, v: usize, times: &[f64], device: &burn::tensor::Device) {
    let first = times[0];
    let mut rest = times[1..].to_vec();
    rest.sort_by(f64::total_cmp);
    let reserved = device.memory_pool_usage().map_or(0, |u| u.bytes_reserved);
    let xent = xent_burn::xent_device_bytes(device).unwrap_or(0);
    let hidden = d.map(|d| format!("\"hidden_dim\": {d}, ")).unwrap_or_default();
    println!(
        "{{\"loss\": \"{which}\", \"rows\": {n}, {hidden}\"classes\": {v}, \"first_ms\": {first:.1}, \"median_ms\": {:.2}, \
         \"min_ms\": {:.2}, \"burn_reserved_mib\": {:.1}, \"xent_mib\": {:.1}}}",
        rest[rest.len() / 2],
        rest[0],
        reserved as f64 / (1 << 20) as f64,
        xent as f64 / (1 << 20) as f64
    );
}
