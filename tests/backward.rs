//! The separate backward (saved LSE + upstream gradient, out of place) on every path,
//! against the reference and against the fused gradient scaled by the upstream gradient.

mod common;

use xent::check::{Tolerance, compare};
use xent::{
    Backend, BackendExt, Labels, Logits, LossOptions, LossOutput, Problem, Reduction, Upstream, synth,
};

/// The separate backward of `logits` against `targets` from the saved `lse`, times `up`,
/// the gradient owned.
fn backward<'a>(
    logits: &'a [f32],
    v: usize,
    targets: &'a [i64],
    lse: &'a [f32],
    up: Upstream<'a>,
) -> Problem<'a> {
    Problem::new(Logits::F32(logits), v, Labels::from(targets)).backward(Some(lse), up)
}

fn check(backend: &dyn Backend, n: usize, v: usize, opts: &LossOptions, what: &str) {
    let logits = synth::logits(n, v, 2.0, 71);
    let mut targets = synth::targets(n, v, 71);
    targets[n / 2] = -100;
    let upstream: Vec<f32> = (0..n).map(|r| 0.5 + r as f32 / n as f32).collect();
    // The LSE a forward saves.
    let forward = Problem::new(Logits::F32(&logits), v, Labels::from(&targets)).lse(true);
    let fwd = xent::Reference.evaluate(forward, opts).unwrap();
    let lse = fwd.lse.unwrap();
    for up in [Upstream::Scalar(1.0), Upstream::Scalar(-2.5), Upstream::PerRow(&upstream)] {
        let want = xent::Reference.evaluate(backward(&logits, v, &targets, &lse, up), opts).unwrap();
        let want = want.gradient.unwrap();
        let got = backend
            .evaluate(backward(&logits, v, &targets, &lse, up), opts)
            .unwrap_or_else(|e| panic!("{what} on {}: {e}", backend.describe()))
            .gradient
            .unwrap();
        compare(
            &LossOutput { gradient: Some(got), ..Default::default() },
            &LossOutput { gradient: Some(want.clone()), ..Default::default() },
            Tolerance::F32,
        )
        .unwrap_or_else(|e| panic!("{what} {up:?} on {}: {e}", backend.describe()));
        // And it is the fused gradient times the upstream gradient.
        if let Upstream::Scalar(g) = up {
            let fused = xent::Reference.cross_entropy_with_grad(&logits, v, &targets, opts).unwrap();
            let scaled: Vec<f32> = fused.gradient.unwrap().iter().map(|x| x * g).collect();
            compare(
                &LossOutput { gradient: Some(want), ..Default::default() },
                &LossOutput { gradient: Some(scaled), ..Default::default() },
                Tolerance::F32,
            )
            .unwrap_or_else(|e| panic!("{what}: reference backward vs fused: {e}"));
        }
    }
}

fn option_sets() -> Vec<(&'static str, LossOptions)> {
    let weights: Vec<f32> = (0..300).map(|c| 0.2 + (c % 9) as f32 / 5.0).collect();
    vec![
        ("mean", LossOptions::new()),
        ("sum", LossOptions::new().reduction(Reduction::Sum)),
        ("none", LossOptions::new().reduction(Reduction::None)),
        ("weights + smoothing", LossOptions::new().weights(weights).label_smoothing(0.1)),
        ("z-loss + softcap + scale", LossOptions::new().z_loss(1e-3).softcap(4.0).logit_scale(1.2)),
        ("n_items", LossOptions::new().n_items(33.0)),
    ]
}

#[test]
fn backward_on_the_cpu_paths() {
    for (what, opts) in option_sets() {
        check(&xent::Reference, 20, 300, &opts, what);
        check(&xent::CpuFast, 20, 300, &opts, what);
    }
}

#[test]
fn backward_on_every_gpu() {
    for gpu in common::gpus("backward_on_every_gpu") {
        for (what, opts) in option_sets() {
            check(gpu, 20, 300, &opts, what);
        }
        check(gpu, 3, 9000, &LossOptions::new(), "few long rows");
    }
}

#[test]
fn bad_saved_lse_or_upstream_is_a_shape_error() {
    let logits = synth::logits(4, 5, 1.0, 1);
    let targets = [0i64, 1, 2, 3];
    let e = xent::CpuFast
        .evaluate(backward(&logits, 5, &targets, &[0.0; 3], Upstream::Scalar(1.0)), &LossOptions::new())
        .unwrap_err();
    assert!(matches!(e, xent::Error::Shape { got: 3, expected: 4, .. }), "{e}");
    let e = xent::Reference
        .evaluate(backward(&logits, 5, &targets, &[0.0; 4], Upstream::PerRow(&[1.0; 5])), &LossOptions::new())
        .unwrap_err();
    assert!(matches!(e, xent::Error::Shape { got: 5, expected: 4, .. }), "{e}");
}

#[test]
fn backward_through_tiny_device_limits() {
    // Rows in chunks, and rows longer than a 64 KiB binding in column pieces.
    let Some(gpu) = common::tiny_device(common::gpus("backward_through_tiny_device_limits")) else { return };
    check(&gpu, 40, 1000, &LossOptions::new(), "chunks of rows");
    check(&gpu, 3, 40000, &LossOptions::new().reduction(Reduction::None), "split rows");
    // More rows than 7 × 7 workgroups: the chunk's rows in several dispatches.
    check(&gpu, 300, 90, &LossOptions::new(), "rows beyond one dispatch");
}
