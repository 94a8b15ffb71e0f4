//! burn-wgpu 0.22's LM head — `nn::Linear` (with bias) + `nn::loss::CrossEntropyLoss` (mean),
//! and for the backward burn's autodiff (gradients of h, W and b) — timed on a wgpu adapter,
//! to set against `xent bench --linear` at the same shape.
//!
//! ```text
//! cd scripts/burn_head
//! cargo run --release -- --rows 512 --hidden-dim 1024 --classes 32000 --iters 3 [--pass all]
//! cargo run --release --no-default-features --features autotune -- ...   # burn without fusion
//! ```
//!
//! The device is burn's wgpu runtime pinned to the Vulkan API (WGSL shaders, as xent's; the
//! `vulkan` feature, burn's SPIR-V path, is not enabled), default adapter: lavapipe where that is
//! the only Vulkan adapter. `--pass forward|forward-backward|all` (default `all`) picks the passes;
//! `all` runs forward-backward first, so its first call carries the autotune of the forward
//! product too. Each pass: a first call timed on its own (burn's autotune and shader
//! compilation included), then `--iters` timed calls; each call ends once the device is
//! synchronised (the loss read back, then `Device::sync`), the gradients staying on the device.
//!
//! Inputs are deterministic (a fixed-seed generator): h ~ N(0, 1) [N, D], W ~ N(0, 4/D) (stored
//! as burn's `[D, V]`), b ~ N(0, 0.25), targets uniform in [0, V). One JSON line per pass:
//! rows, hidden_dim, classes, pass, first_ms, median_ms, min_ms, loss, adapter, and the process's
//! resident memory (`VmRSS`/`VmHWM`; the peak reset through `/proc/self/clear_refs`):
//! `rss_inputs_mib` once the inputs are on the device, `first_peak_rss_mib` the peak up to the end
//! of the first call (lavapipe's LLVM shader compilation and the autotune runs included),
//! `timed_peak_rss_mib` the peak over the timed calls alone, and `timed_peak_beyond_inputs_mib`
//! that less the inputs' RSS. On lavapipe device memory is host memory, so that difference is
//! the call's memory, plus the compiled pipelines lavapipe keeps (a few hundred MiB: compare a
//! `--rows 1` run). With `--pass all` the forward's peak also holds what burn's pool kept from
//! the backward before it, so run `--pass forward` alone for the forward's own peak. The reset
//! also lowers what `/usr/bin/time -v` reports as the maximum RSS (the kernel's same counter).

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::wgpu::WgpuBackend;
use burn::tensor::{Device, DeviceKind, Int, Tensor, TensorData};
use std::time::Instant;

/// xorshift64* with Box–Muller: deterministic N(0, 1) and uniform draws.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
    fn normals(&mut self, len: usize, scale: f64) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let (u, v) = (self.unit(), self.unit());
                (scale * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect()
    }
}

/// A field of `/proc/self/status` in MiB (`VmRSS`, `VmHWM`).
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| {
        l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse::<f64>().ok()
    });
    kib.unwrap_or(f64::NAN) / 1024.0
}

/// Resets `VmHWM` to the current RSS (Linux: `echo 5 > /proc/self/clear_refs`).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |name, default| arg(&args, name, default).parse::<usize>().expect(name);
    let (n, d, v, iters) =
        (num("--rows", "512"), num("--hidden-dim", "1024"), num("--classes", "32000"), num("--iters", "3"));
    let passes = match arg(&args, "--pass", "all").as_str() {
        "all" => vec!["forward-backward", "forward"],
        "forward" => vec!["forward"],
        "forward-backward" => vec!["forward-backward"],
        p => panic!("--pass {p}: forward, forward-backward or all"),
    };

    let plain = Device::wgpu_options()
        .graphics_api(WgpuBackend::Vulkan)
        .device_kind(DeviceKind::DefaultDevice)
        .init()
        .expect("a Vulkan adapter");
    let adapter = plain.identity().map_or("?".to_string(), |i| i.name);
    let device = plain.clone().autodiff();

    // The head on the autodiff device. `LinearConfig::new(d, v).with_bias(true).init(&device)`
    // builds the same module with its own random init; the struct is filled directly so that no
    // discarded init buffer sits in the pool before the memory baseline.
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let h = Tensor::<2>::from_data(TensorData::new(rng.normals(n * d, 1.0), [n, d]), &device).require_grad();
    let w = rng.normals(d * v, 2.0 / (d as f64).sqrt());
    let linear = Linear {
        weight: Param::from_data(TensorData::new(w, [d, v]), &device),
        bias: Some(Param::from_data(TensorData::new(rng.normals(v, 0.5), [v]), &device)),
    };
    let t: Vec<i64> = (0..n).map(|_| (rng.next() % v as u64) as i64).collect();
    let targets = Tensor::<1, Int>::from_data(TensorData::new(t, [n]), &device);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    plain.sync().expect("sync");
    let rss_inputs = status_mib("VmRSS");

    for pass in passes {
        let backward = pass == "forward-backward";
        // Forward only: the same module and inputs without autodiff (no graph, no gradients).
        let (lin, hh, tt) = if backward {
            (linear.clone(), h.clone(), targets.clone())
        } else {
            (linear.valid(), h.clone().without_autodiff(), targets.clone().without_autodiff())
        };
        reset_peak();
        let call = || -> (f64, f32) {
            let start = Instant::now();
            let loss = loss_fn.forward(lin.forward(hh.clone()), tt.clone());
            let grads = backward.then(|| {
                let g = loss.backward();
                let (dh, dw, db) =
                    (hh.grad(&g), lin.weight.val().grad(&g), lin.bias.as_ref().unwrap().val().grad(&g));
                assert!(dh.is_some() && dw.is_some() && db.is_some(), "missing gradients");
                (dh, dw, db)
            });
            let value = loss.into_scalar::<f32>();
            plain.sync().expect("sync");
            let ms = start.elapsed().as_secs_f64() * 1e3;
            drop(grads);
            (ms, value)
        };
        let (first, loss) = call();
        let peak = status_mib("VmHWM");
        reset_peak();
        let mut ms: Vec<f64> = (0..iters).map(|_| call().0).collect();
        ms.sort_by(f64::total_cmp);
        let steady = status_mib("VmHWM");
        println!(
            "{{\"rows\":{n},\"hidden_dim\":{d},\"classes\":{v},\"pass\":\"{pass}\",\"first_ms\":{first:.1},\
             \"median_ms\":{:.1},\"min_ms\":{:.1},\"iters\":{iters},\"loss\":{loss:.5},\"adapter\":\"{adapter}\",\
             \"fusion\":{},\"autotune\":{},\"rss_inputs_mib\":{rss_inputs:.1},\"first_peak_rss_mib\":{peak:.1},\
             \"timed_peak_rss_mib\":{steady:.1},\"timed_peak_beyond_inputs_mib\":{:.1}}}",
            ms.get(ms.len() / 2).copied().unwrap_or(f64::NAN),
            ms.first().copied().unwrap_or(f64::NAN),
            cfg!(feature = "fusion"),
            cfg!(feature = "autotune"),
            steady - rss_inputs
        );
    }
}
