//! xent_burn against xent's f64 reference (every option, every reduction) and against
//! burn's own `CrossEntropyLoss` (where burn has the option), forward and gradient
//! through burn's autodiff, on a wgpu device (xent's kernels: lavapipe in CI) and on an
//! NdArray device (burn's operations); ordering with burn's fused work around the loss;
//! the training loop is in tests/training.rs (its own process: the buffers it counts are
//! its alone).
//!
//! Tolerances as for xent itself: loss rtol 1e-5 (+1e-6 absolute), gradient 1e-6
//! absolute (each element of ∂loss/∂x is a probability difference of O(1/D) in f32).
#![allow(deprecated)] // Device::ndarray: burn 0.22 keeps it for CPU tests.

mod common;
use common::{option_sets, to_vec};
use std::sync::OnceLock;

use burn::tensor::{Device, Int, Tensor, TensorData};
use xent::{Backend as _, Gradient, Labels, Logits, LossOptions, Problem, Reduction, Upstream};

/// The wgpu device of the test process (xent registered), or none with XENT_SKIP_GPU=1.
fn wgpu() -> Option<Device> {
    static DEVICE: OnceLock<Option<Device>> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            if std::env::var("XENT_SKIP_GPU").is_ok_and(|v| v == "1") {
                eprintln!("XENT_SKIP_GPU=1: skipping the wgpu device");
                return None;
            }
            let device = xent_burn::init_wgpu(Default::default()).unwrap_or_else(|e| {
                panic!(
                    "no wgpu adapter for burn ({e}); install a Vulkan driver (Debian: mesa-vulkan-drivers, \
                     lavapipe) or set XENT_SKIP_GPU=1 to skip the GPU tests"
                )
            });
            assert!(xent_burn::is_accelerated(&device), "xent registered on burn's wgpu device");
            Some(device)
        })
        .clone()
}

/// Every device the test runs on: (name, autodiff device, whether xent's kernels run).
fn devices() -> Vec<(&'static str, Device, bool)> {
    let mut d = vec![("ndarray", Device::ndarray().autodiff(), false)];
    if let Some(w) = wgpu() {
        d.push(("wgpu", w.autodiff(), true));
    }
    d
}

fn values(n: usize, seed: u64, scale: f64) -> Vec<f32> {
    xent::synth::logits(1, n, scale, seed)
}

/// Class indices in [0, V) with every fifth row ignored (−100).
fn targets(n: usize, v: usize, seed: u64) -> Vec<i64> {
    let mut t = xent::synth::targets(n, v, seed);
    t.iter_mut().step_by(5).for_each(|t| *t = -100);
    t
}

fn close(got: &[f32], want: &[f32], rtol: f32, atol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = g == w || (g - w).abs() <= atol + rtol * w.abs();
        assert!(ok, "{what}: element {i}: {g} vs {w}");
    }
}

#[test]
fn every_option_and_reduction_matches_the_reference() {
    let (n, v) = (23, 37);
    let x = values(n * v, 1, 2.0);
    let t = targets(n, v, 2);
    for (name, dev, accelerated) in devices() {
        assert_eq!(xent_burn::is_accelerated(&dev), accelerated, "{name}");
        for (set, base) in option_sets(v) {
            // With ignore_index 2, −100 is no class: those rows take class 2 (ignored).
            let t: Vec<i64> = t.iter().map(|&c| if c < 0 && set == "ignore 2" { 2 } else { c }).collect();
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let opts = base.clone().reduction(reduction);
                let what = format!("{name}, {set}, {reduction:?}");
                let want = xent::Reference
                    .evaluate(
                        Problem::new(Logits::F32(&x), v, Labels::from(&t))
                            .gradient(Gradient::Owned)
                            .row_losses(true),
                        &opts,
                    )
                    .unwrap();
                let logits = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, v]), &dev).require_grad();
                let targets = Tensor::<1, Int>::from_data(TensorData::new(t.clone(), [n]), &dev);
                let loss = xent_burn::cross_entropy(logits.clone(), targets, &opts);
                // Upstream 2.5 (a scalar for mean/sum; per row for none, summed).
                let grads = loss.clone().mul_scalar(2.5).sum().backward();
                let got = to_vec(loss);
                match reduction {
                    Reduction::None => close(&got, want.row_losses.as_ref().unwrap(), 1e-5, 1e-6, &what),
                    _ => close(&got, &[want.loss.unwrap()], 1e-5, 1e-6, &what),
                }
                let g = to_vec(logits.grad(&grads).unwrap());
                if accelerated {
                    // xent's kernels ran: its workspace on the device holds buffers.
                    assert!(xent_burn::xent_buffer_allocations(&dev).unwrap_or(0) > 0, "{what}: xent ran");
                }
                let wg: Vec<f32> = want.gradient.as_ref().unwrap().iter().map(|g| g * 2.5).collect();
                close(&g, &wg, 0.0, 2.5e-6, &format!("{what}: gradient"));
            }
        }
    }
}

#[test]
fn per_row_upstream_gradients_under_none() {
    let (n, v) = (17, 300);
    let x = values(n * v, 3, 3.0);
    let t = targets(n, v, 4);
    let up = values(n, 5, 1.0);
    let opts = LossOptions::new().reduction(Reduction::None).label_smoothing(0.05);
    let p = || Problem::new(Logits::F32(&x), v, Labels::from(&t));
    let lse = xent::Reference.evaluate(p().lse(true), &opts).unwrap().lse.unwrap();
    let want = xent::Reference
        .evaluate(p().gradient(Gradient::Owned).backward(Some(&lse), Upstream::PerRow(&up)), &opts)
        .unwrap()
        .gradient
        .unwrap();
    for (name, dev, _) in devices() {
        let logits = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, v]), &dev).require_grad();
        let targets = Tensor::<1, Int>::from_data(TensorData::new(t.clone(), [n]), &dev);
        let u = Tensor::<1>::from_data(TensorData::new(up.clone(), [n]), &dev);
        let grads = (xent_burn::cross_entropy(logits.clone(), targets, &opts) * u).sum().backward();
        close(&to_vec(logits.grad(&grads).unwrap()), &want, 0.0, 1e-6, name);
    }
}

#[test]
fn probability_targets_match_the_reference() {
    let (n, v) = (19, 50);
    let x = values(n * v, 6, 2.0);
    let (probs, _) = {
        let u = values(n * v, 7, 1.0);
        let mut p = vec![0.0f32; n * v];
        for (row, ur) in p.chunks_mut(v).zip(u.chunks(v)) {
            let e: Vec<f32> = ur.iter().map(|x| x.exp()).collect();
            let s: f32 = e.iter().sum();
            row.iter_mut().zip(&e).for_each(|(p, e)| *p = e / s);
        }
        (p, ())
    };
    for (name, dev, _) in devices() {
        for (set, base) in option_sets(v).into_iter().filter(|(s, _)| !s.starts_with("ignore")) {
            for reduction in [Reduction::Mean, Reduction::None] {
                let opts = base.clone().reduction(reduction);
                let what = format!("{name}, probabilities, {set}, {reduction:?}");
                let want = xent::Reference
                    .evaluate(
                        Problem::new(Logits::F32(&x), v, Labels::Probabilities(&probs))
                            .gradient(Gradient::Owned)
                            .row_losses(true),
                        &opts,
                    )
                    .unwrap();
                let logits = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, v]), &dev).require_grad();
                let targets = Tensor::<2>::from_data(TensorData::new(probs.clone(), [n, v]), &dev);
                let loss = xent_burn::cross_entropy_probs(logits.clone(), targets, &opts);
                let grads = loss.clone().sum().backward();
                match reduction {
                    Reduction::None => {
                        close(&to_vec(loss), want.row_losses.as_ref().unwrap(), 1e-5, 1e-6, &what)
                    }
                    _ => close(&to_vec(loss), &[want.loss.unwrap()], 1e-5, 1e-6, &what),
                }
                close(
                    &to_vec(logits.grad(&grads).unwrap()),
                    want.gradient.as_ref().unwrap(),
                    0.0,
                    1e-6,
                    &what,
                );
            }
        }
    }
}

/// f16 logits on the wgpu device: the loss (f32) against the reference on the same half
/// values (rtol 1e-5), the gradient in the logits' type, rounded once from f32 (half an
/// ulp: 2⁻¹¹ relative, + 1e-6).
#[test]
fn half_logits_on_the_wgpu_device() {
    use burn::tensor::DType;
    let Some(dev) = wgpu() else { return };
    let dev = dev.autodiff();
    let (n, v) = (21, 130);
    let t = targets(n, v, 12);
    // f16 only: burn's WGSL compiler has no bf16 (cubecl-wgpu's to_wgsl refuses the type),
    // so burn-wgpu holds no bf16 tensor for xent to read.
    for (format, dtype, ulp) in [(xent::HalfFormat::F16, DType::F16, 2f32.powi(-11))] {
        let x: Vec<f32> = values(n * v, 11, 3.0).iter().map(|&x| format.to_f32(format.from_f32(x))).collect();
        for (set, opts) in
            option_sets(v).into_iter().filter(|(s, _)| ["plain", "smoothing", "all"].contains(s))
        {
            let what = format!("{dtype:?}, {set}");
            let want = xent::Reference
                .evaluate(Problem::new(Logits::F32(&x), v, Labels::from(&t)).gradient(Gradient::Owned), &opts)
                .unwrap();
            let logits =
                Tensor::<2>::from_data(TensorData::new(x.clone(), [n, v]), &dev).cast(dtype).require_grad();
            let targets = Tensor::<1, Int>::from_data(TensorData::new(t.clone(), [n]), &dev);
            let loss = xent_burn::cross_entropy(logits.clone(), targets, &opts);
            let grads = loss.clone().backward();
            close(&to_vec(loss), &[want.loss.unwrap()], 1e-5, 1e-6, &what);
            let g = logits.grad(&grads).unwrap();
            assert_eq!(g.dtype(), dtype, "{what}: the gradient in the logits' type");
            close(&to_vec(g), want.gradient.as_ref().unwrap(), ulp, 1e-6, &format!("{what}: gradient"));
        }
    }
}

/// Binary cross-entropy with logits: every option that applies (class weights,
/// `pos_weight`, `n_items`) and reduction, forward and gradient (upstream 2.5 for
/// `mean`/`sum`, one per element for `none`).
#[test]
fn binary_cross_entropy_with_logits_matches_the_reference() {
    let (n, v) = (13, 29);
    let x = values(n * v, 8, 4.0);
    // 0, 1 and soft targets.
    let y: Vec<f32> = values(n * v, 9, 1.0)
        .iter()
        .enumerate()
        .map(|(i, u)| match i % 3 {
            0 => 0.0,
            1 => 1.0,
            _ => u.abs().min(1.0),
        })
        .collect();
    let up = values(n * v, 10, 1.0);
    let w: Vec<f32> = (0..v).map(|c| 0.5 + (c % 3) as f32 * 0.4).collect();
    let pw: Vec<f32> = (0..v).map(|c| 0.25 + (c % 5) as f32 * 0.75).collect();
    let sets = [
        ("plain", LossOptions::new()),
        ("weights", LossOptions::new().weights(w.clone())),
        ("pos_weight", LossOptions::new().pos_weight(pw.clone())),
        ("both", LossOptions::new().weights(w).pos_weight(pw)),
        ("n_items", LossOptions::new().n_items(100.0)),
    ];
    for (name, dev, accelerated) in devices() {
        for (set, base) in &sets {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let opts = base.clone().reduction(reduction);
                let what = format!("{name}, binary, {set}, {reduction:?}");
                let p = || Problem::new(Logits::F32(&x), v, Labels::Binary(&y));
                let want = xent::Reference.evaluate(p().row_losses(true), &opts).unwrap();
                let upstream = match reduction {
                    Reduction::None => Upstream::PerElement(&up),
                    _ => Upstream::Scalar(2.5),
                };
                let want_grad = xent::Reference
                    .evaluate(p().gradient(Gradient::Owned).backward(None, upstream), &opts)
                    .unwrap()
                    .gradient
                    .unwrap();
                let logits = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, v]), &dev).require_grad();
                let targets = Tensor::<2>::from_data(TensorData::new(y.clone(), [n, v]), &dev);
                let loss = xent_burn::binary_cross_entropy_with_logits(logits.clone(), targets, &opts);
                let grads = match reduction {
                    Reduction::None => {
                        assert_eq!(loss.dims(), [n, v], "{what}");
                        let u = Tensor::<2>::from_data(TensorData::new(up.clone(), [n, v]), &dev);
                        (loss.clone() * u).sum().backward()
                    }
                    _ => {
                        assert_eq!(loss.dims(), [1, 1], "{what}");
                        loss.clone().mul_scalar(2.5).sum().backward()
                    }
                };
                match reduction {
                    Reduction::None => {
                        close(&to_vec(loss), want.row_losses.as_ref().unwrap(), 1e-5, 1e-6, &what)
                    }
                    _ => close(&to_vec(loss), &[want.loss.unwrap()], 1e-5, 1e-6, &what),
                }
                if accelerated {
                    assert!(xent_burn::xent_buffer_allocations(&dev).unwrap_or(0) > 0, "{what}: xent ran");
                }
                close(
                    &to_vec(logits.grad(&grads).unwrap()),
                    &want_grad,
                    0.0,
                    2.5e-6,
                    &format!("{what}: gradient"),
                );
            }
        }
    }
    // Options that do not apply to binary targets are typed errors.
    let dev = Device::ndarray();
    let logits = Tensor::<2>::zeros([2, 3], &dev);
    let err = xent_burn::try_binary_cross_entropy_with_logits(
        logits.clone(),
        logits.clone(),
        &LossOptions::new().label_smoothing(0.1),
    )
    .unwrap_err();
    assert!(err.to_string().contains("label smoothing"), "{err}");
    let err = xent_burn::try_binary_cross_entropy_with_logits(
        logits,
        Tensor::<2>::zeros([2, 4], &dev),
        &LossOptions::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("[2, 4]"), "{err}");
}

/// burn's own loss where it has the option: plain, class weights, pad tokens.
#[test]
fn forward_and_gradient_equal_burns_cross_entropy_loss() {
    use burn::nn::loss::CrossEntropyLossConfig as BurnConfig;
    let (n, v) = (32, 64);
    let x = values(n * v, 8, 2.0);
    let t: Vec<i64> = xent::synth::targets(n, v, 9).into_iter().map(|t| t % 60 + 1).collect();
    let w: Vec<f32> = (0..v).map(|c| 0.5 + (c % 3) as f32 * 0.5).collect();
    let cases = [
        ("plain", BurnConfig::new(), LossOptions::new()),
        ("weights", BurnConfig::new().with_weights(Some(w.clone())), LossOptions::new().weights(w)),
        ("pad token 5", BurnConfig::new().with_pad_tokens(Some(vec![5])), LossOptions::new().ignore_index(5)),
    ];
    for (name, dev, _) in devices() {
        for (case, burn_cfg, opts) in &cases {
            let what = format!("{name}, {case}");
            let run = |ours: bool| {
                let logits = Tensor::<2>::from_data(TensorData::new(x.clone(), [n, v]), &dev).require_grad();
                let targets = Tensor::<1, Int>::from_data(TensorData::new(t.clone(), [n]), &dev);
                let loss = if ours {
                    xent_burn::cross_entropy(logits.clone(), targets, opts)
                } else {
                    burn_cfg.init(&dev).forward(logits.clone(), targets)
                };
                let grads = loss.clone().backward();
                (to_vec(loss), to_vec(logits.grad(&grads).unwrap()))
            };
            let (ours, theirs) = (run(true), run(false));
            close(&ours.0, &theirs.0, 1e-5, 1e-6, &what);
            close(&ours.1, &theirs.1, 0.0, 1e-6, &format!("{what}: gradient"));
        }
    }
}

/// burn's fused element-wise work before and after the loss, on the device burn batches
/// it on: xent reads the logits burn computed and burn reads the loss xent wrote.
#[test]
fn burns_work_around_the_loss_is_ordered() {
    let Some(dev) = wgpu() else { return };
    let (n, v) = (64, 500);
    let x = values(n * v, 10, 1.0);
    let t = xent::synth::targets(n, v, 11);
    let opts = LossOptions::new().reduction(Reduction::None);
    let rows = xent::Reference
        .evaluate(
            Problem::new(
                Logits::F32(&x.iter().map(|x| x * 3.0 - 1.0).collect::<Vec<_>>()),
                v,
                Labels::from(&t),
            )
            .row_losses(true),
            &opts,
        )
        .unwrap()
        .row_losses
        .unwrap();
    for round in 0..3 {
        let logits =
            Tensor::<2>::from_data(TensorData::new(x.clone(), [n, v]), &dev).mul_scalar(3.0).add_scalar(-1.0);
        let targets = Tensor::<1, Int>::from_data(TensorData::new(t.clone(), [n]), &dev);
        let out = xent_burn::cross_entropy(logits, targets, &opts).mul_scalar(2.0).add_scalar(1.0);
        let want: Vec<f32> = rows.iter().map(|l| l * 2.0 + 1.0).collect();
        close(&to_vec(out), &want, 1e-5, 1e-5, &format!("round {round}"));
    }
}
