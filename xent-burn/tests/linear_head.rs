//! `xent_burn::linear_cross_entropy` against xent's f64 reference head (every option,
//! every reduction, with and without a bias, several blocks of rows), forward and the
//! gradients of h, W and b through burn's autodiff, on a wgpu device (blocks through
//! xent's fused kernel) and on an NdArray device (burn's operations).
//!
//! Tolerances: those of xent's own linear-head tests (tests/common/head.rs, included
//! here), derived from the f32 error of products of length D — they hold for any order of
//! summation, burn's matrix product's included — and of the sums of dW and db over N rows.
#![allow(deprecated)] // Device::ndarray: burn 0.22 keeps it for CPU tests.

#[path = "../../tests/common/head.rs"]
#[allow(dead_code)]
mod head;

mod common;
use burn::tensor::{Device, Int, Tensor, TensorData};
use common::{option_sets, to_vec};
use std::sync::{Mutex, MutexGuard, OnceLock};
use xent::{Backend as _, Gradient, LossOptions, LossOutput, Problem, Reduction};

fn devices() -> Vec<(&'static str, Device, bool)> {
    static WGPU: OnceLock<Option<Device>> = OnceLock::new();
    let mut d = vec![("ndarray", Device::ndarray().autodiff(), false)];
    let wgpu = WGPU.get_or_init(|| {
        if std::env::var("XENT_SKIP_GPU").is_ok_and(|v| v == "1") {
            eprintln!("XENT_SKIP_GPU=1: skipping the wgpu device");
            return None;
        }
        Some(xent_burn::init_wgpu(Default::default()).unwrap_or_else(|e| {
            panic!(
                "no wgpu adapter for burn ({e}); install a Vulkan driver (Debian: mesa-vulkan-drivers, lavapipe) \
                 or set XENT_SKIP_GPU=1 to skip the GPU tests"
            )
        }))
    });
    if let Some(w) = wgpu {
        d.push(("wgpu", w.clone().autodiff(), true));
    }
    d
}

/// The head's pass counters are the process's: one test at a time reads them.
fn counters() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every option and reduction, bias or not, in blocks of 4 rows (6 blocks, the last
/// ragged) and in one block.
#[test]
fn linear_cross_entropy_matches_the_reference_head() {
    let (n, d, v) = (23, 16, 37);
    for (name, dev, accelerated) in devices() {
        for (set, base) in option_sets(v) {
            let mut hd = head::head(n, d, v, 3);
            if set == "ignore 2" {
                hd.t.iter_mut().filter(|t| **t < 0).for_each(|t| *t = 2);
            }
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                for (bias, block_rows) in [(true, 4), (false, 4), (true, n)] {
                    let opts = base.clone().reduction(reduction);
                    let what = format!("{name}, {set}, {reduction:?}, bias {bias}, blocks of {block_rows}");
                    let problem =
                        Problem::linear(hd.linear(bias), &hd.t).gradient(Gradient::Owned).row_losses(true);
                    let mut want = xent::Reference.evaluate(problem, &opts).unwrap();
                    want.z_loss = None;
                    if reduction != Reduction::None {
                        want.row_losses = None;
                    }
                    let h =
                        Tensor::<2>::from_data(TensorData::new(hd.h.clone(), [n, d]), &dev).require_grad();
                    let w =
                        Tensor::<2>::from_data(TensorData::new(hd.w.clone(), [v, d]), &dev).require_grad();
                    let b = Tensor::<1>::from_data(TensorData::new(hd.b.clone(), [v]), &dev).require_grad();
                    let t = Tensor::<1, Int>::from_data(TensorData::new(hd.t.clone(), [n]), &dev);
                    let lock = counters();
                    let before = xent_burn::head_passes();
                    let loss = xent_burn::try_linear_cross_entropy_blocks(
                        h.clone(),
                        w.clone(),
                        bias.then(|| b.clone()),
                        t,
                        &opts,
                        block_rows,
                    )
                    .unwrap();
                    // Upstream 1 (the sum of the row losses for none).
                    let grads = loss.clone().sum().backward();

                    let values = to_vec(loss);
                    let got = LossOutput {
                        loss: (reduction != Reduction::None).then(|| values[0]),
                        row_losses: (reduction == Reduction::None).then(|| values.clone()),
                        grad_hidden: Some(to_vec(h.grad(&grads).unwrap())),
                        grad_weight: Some(to_vec(w.grad(&grads).unwrap())),
                        grad_bias: bias.then(|| to_vec(b.grad(&grads).unwrap())),
                        ..Default::default()
                    };
                    // Read after the values: burn's fusion runs the ops when they are read.
                    let passes = xent_burn::head_passes();
                    drop(lock);
                    if !bias {
                        want.grad_bias = None;
                        assert!(b.grad(&grads).is_none(), "{what}: no bias, no gradient for it");
                    }
                    if accelerated {
                        assert!(
                            xent_burn::xent_buffer_allocations(&dev).unwrap_or(0) > 0,
                            "{what}: xent ran"
                        );
                        // `mean`/`sum` with upstream 1: the gradients from the forward's pass.
                        let fused = reduction != Reduction::None;
                        let way = xent_burn::HeadPasses {
                            fused_forwards: before.fused_forwards + u64::from(fused),
                            recomputing_backwards: before.recomputing_backwards + u64::from(!fused),
                        };
                        assert_eq!(passes, way, "{what}: the way to the gradients");
                    }
                    let bounds = head::bounds(&hd, bias, &opts, head::kappa(&hd, &opts), 1.0);
                    head::check(name, &got, &want, &hd, &bounds, &what);
                }
            }
        }
    }
}

/// An upstream other than 1 (`2 · loss`): the forward formed the gradients of the loss
/// (under `mean` and `sum`), and the backward recomputes them scaled by 2 in xent's
/// kernel; the values are twice the reference's.
#[test]
fn a_scaled_upstream_recomputes_the_head_gradients() {
    let (n, d, v) = (19, 12, 29);
    let hd = head::head(n, d, v, 5);
    for (name, dev, accelerated) in devices() {
        for reduction in [Reduction::Mean, Reduction::Sum] {
            let opts = LossOptions::new().label_smoothing(0.1).reduction(reduction);
            let what = format!("{name}, {reduction:?}, upstream 2");
            let problem = Problem::linear(hd.linear(true), &hd.t).gradient(Gradient::Owned);
            let mut want = xent::Reference.evaluate(problem, &opts).unwrap();
            for g in [&mut want.grad_hidden, &mut want.grad_weight, &mut want.grad_bias].into_iter().flatten()
            {
                g.iter_mut().for_each(|x| *x *= 2.0);
            }
            let h = Tensor::<2>::from_data(TensorData::new(hd.h.clone(), [n, d]), &dev).require_grad();
            let w = Tensor::<2>::from_data(TensorData::new(hd.w.clone(), [v, d]), &dev).require_grad();
            let b = Tensor::<1>::from_data(TensorData::new(hd.b.clone(), [v]), &dev).require_grad();
            let t = Tensor::<1, Int>::from_data(TensorData::new(hd.t.clone(), [n]), &dev);
            let lock = counters();
            let before = xent_burn::head_passes();
            let loss =
                xent_burn::try_linear_cross_entropy(h.clone(), w.clone(), Some(b.clone()), t, &opts).unwrap();
            let grads = (loss.clone() * 2.0).backward();
            let got = LossOutput {
                loss: Some(to_vec(loss)[0]),
                grad_hidden: Some(to_vec(h.grad(&grads).unwrap())),
                grad_weight: Some(to_vec(w.grad(&grads).unwrap())),
                grad_bias: Some(to_vec(b.grad(&grads).unwrap())),
                ..Default::default()
            };
            // Read after the values: burn's fusion runs the ops when they are read.
            let after = xent_burn::head_passes();
            drop(lock);
            if accelerated {
                assert_eq!(
                    after.fused_forwards,
                    before.fused_forwards + 1,
                    "{what}: the forward formed them"
                );
                assert_eq!(
                    after.recomputing_backwards,
                    before.recomputing_backwards + 1,
                    "{what}: the backward recomputed them"
                );
            }
            let bounds = head::bounds(&hd, true, &opts, head::kappa(&hd, &opts), 2.0);
            head::check(name, &got, &want, &hd, &bounds, &what);
        }
    }
}

/// Shapes that disagree are typed errors naming both sizes.
#[test]
fn linear_cross_entropy_refuses_shapes_that_disagree() {
    let dev = Device::ndarray();
    let h = Tensor::<2>::zeros([4, 8], &dev);
    let w = Tensor::<2>::zeros([10, 8], &dev);
    let t = Tensor::<1, Int>::zeros([4], &dev);
    let o = LossOptions::new();
    let err = |r: Result<Tensor<1>, xent_burn::Error>| r.unwrap_err().to_string();
    let e = err(xent_burn::try_linear_cross_entropy(
        h.clone(),
        Tensor::zeros([10, 7], &dev),
        None,
        t.clone(),
        &o,
    ));
    assert!(e.contains('7') && e.contains('8'), "{e}");
    let e = err(xent_burn::try_linear_cross_entropy(
        h.clone(),
        w.clone(),
        Some(Tensor::zeros([9], &dev)),
        t.clone(),
        &o,
    ));
    assert!(e.contains("9") && e.contains("10"), "{e}");
    let e = err(xent_burn::try_linear_cross_entropy(h, w, None, Tensor::zeros([5], &dev), &o));
    assert!(e.contains('5') && e.contains('4'), "{e}");
}
