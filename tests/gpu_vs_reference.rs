//! Every GPU result checked against the f64 CPU reference, on every adapter.

mod common;

use xent::check::{Tolerance, compare, conformance_cases};
use xent::{
    Backend, BackendExt, Error, Gradient, Labels, Logits, LossOptions, LossOutput, Problem, Reduction,
    Reference, synth,
};

/// What a problem asks for besides the loss.
#[derive(Clone, Copy)]
struct Asks {
    /// An owned f32 gradient.
    grad: bool,
    /// The per-row losses (always there for `none`).
    rows: bool,
    /// The per-row LSE.
    lse: bool,
}

const GRAD: Asks = Asks { grad: true, rows: false, lse: false };
const GRAD_ROWS: Asks = Asks { grad: true, rows: true, lse: false };
const EVERYTHING: Asks = Asks { grad: true, rows: true, lse: true };

/// The problem of f32 `logits` against class indices, with what `asks` says.
fn problem<'a>(logits: &'a [f32], classes: usize, targets: &'a [i64], asks: Asks) -> Problem<'a> {
    Problem::new(Logits::F32(logits), classes, Labels::from(targets))
        .gradient(if asks.grad { Gradient::Owned } else { Gradient::None })
        .row_losses(asks.rows)
        .lse(asks.lse)
}

/// The problem with the gradient written over a copy of the logits (`in_place`).
fn in_place_problem<'a>(
    in_place: &'a mut [f32],
    classes: usize,
    targets: &'a [i64],
    asks: Asks,
) -> Problem<'a> {
    Problem::new(Logits::F32Mut(in_place), classes, Labels::from(targets))
        .gradient(Gradient::InPlace)
        .row_losses(asks.rows)
        .lse(asks.lse)
}

fn verify(logits: &[f32], classes: usize, targets: &[i64], opts: &LossOptions, asks: Asks, what: &str) {
    let want = Reference.evaluate(problem(logits, classes, targets, asks), opts).unwrap();
    for gpu in common::gpus(what) {
        let got = gpu
            .evaluate(problem(logits, classes, targets, asks), opts)
            .unwrap_or_else(|e| panic!("{what} on {}: {e}", common::name(gpu)));
        compare(&got, &want, Tolerance::F32)
            .unwrap_or_else(|e| panic!("{what} on {}: {e}", common::name(gpu)));
    }
}

#[test]
fn conformance_set_on_every_adapter() {
    let cases = conformance_cases();
    for gpu in common::gpus("conformance_set_on_every_adapter") {
        for case in &cases {
            case.verify(gpu).unwrap_or_else(|e| panic!("{} on {}: {e}", case.name, common::name(gpu)));
        }
    }
}

#[test]
fn sweep_of_class_counts_row_counts_and_reductions() {
    let classes = [1usize, 2, 3, 31, 255, 256, 257, 513, 1000, 4097, 32000, 131072];
    let rows = [1usize, 7, 129];
    let mut seed = 100;
    for &v in &classes {
        for &n in &rows {
            if n * v > 3_000_000 {
                continue;
            }
            seed += 1;
            let logits = synth::logits(n, v, 2.0, seed);
            let mut targets = synth::targets(n, v, seed);
            if n > 1 {
                targets[n / 2] = -100;
            }
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let opts = LossOptions::new().reduction(reduction);
                verify(&logits, v, &targets, &opts, EVERYTHING, &format!("{n}x{v} {reduction:?}"));
            }
        }
    }
}

#[test]
fn in_place_gradient_is_bit_identical_to_separate_and_runs_are_deterministic() {
    let (n, v) = (37, 3001);
    let logits = synth::logits(n, v, 3.0, 7);
    let targets = synth::targets(n, v, 7);
    let opts = LossOptions::new();
    for gpu in common::gpus("in_place_gradient_is_bit_identical") {
        let a = gpu.evaluate(problem(&logits, v, &targets, GRAD_ROWS), &opts).unwrap();
        let b = gpu.evaluate(problem(&logits, v, &targets, GRAD_ROWS), &opts).unwrap();
        assert_eq!(a, b, "two runs differ on {}", common::name(gpu));
        let mut in_place = logits.clone();
        let c = gpu.evaluate(in_place_problem(&mut in_place, v, &targets, GRAD_ROWS), &opts).unwrap();
        assert_eq!(c.loss.map(f32::to_bits), a.loss.map(f32::to_bits));
        let sep = a.gradient.as_ref().unwrap();
        assert!(sep.iter().zip(&in_place).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

#[test]
fn ignored_rows_have_zero_loss_and_exactly_zero_gradient() {
    let (n, v) = (10, 50);
    let mut logits = synth::logits(n, v, 2.0, 9);
    logits[3 * v + 4] = f32::NAN; // an ignored row may even hold NaN
    let mut targets = synth::targets(n, v, 9);
    targets[3] = 4;
    targets[5] = 4;
    let opts = LossOptions::new().ignore_index(4);
    for gpu in common::gpus("ignored_rows_have_zero_loss") {
        let out = gpu.evaluate(problem(&logits, v, &targets, GRAD_ROWS), &opts).unwrap();
        let rows = out.row_losses.unwrap();
        let grad = out.gradient.unwrap();
        for r in [3, 5] {
            assert_eq!(rows[r], 0.0);
            assert!(grad[r * v..(r + 1) * v].iter().all(|&g| g.to_bits() == 0));
        }
        assert!(out.loss.unwrap().is_finite());
    }
}

#[test]
fn masked_offset_and_non_finite_rows() {
    let (n, v) = (6, 700);
    let mut logits = synth::logits(n, v, 2.0, 10);
    let targets = synth::targets(n, v, 10);
    // Row 0: half the vocabulary masked. Row 1: +1e4 offset. Row 2: NaN. Row 3: +inf.
    // Row 4: all -inf. Row 5: spread of thousands.
    for c in 0..v {
        if c % 2 == 1 && c != targets[0] as usize {
            logits[c] = f32::NEG_INFINITY;
        }
        logits[v + c] += 1e4;
        logits[4 * v + c] = f32::NEG_INFINITY;
        logits[5 * v + c] *= 1500.0;
    }
    logits[2 * v + 11] = f32::NAN;
    logits[3 * v + 12] = f32::INFINITY;
    let opts = LossOptions::new().reduction(Reduction::None);
    verify(&logits, v, &targets, &opts, GRAD, "non-finite rows");
    let out = Reference.evaluate(problem(&logits, v, &targets, GRAD), &opts).unwrap();
    let rows = out.row_losses.unwrap();
    assert!(rows[0].is_finite() && rows[1].is_finite() && rows[5].is_finite());
    assert!(rows[2].is_nan() && rows[3].is_nan() && rows[4].is_nan());
}

#[test]
fn bad_targets_are_typed_errors_before_dispatch() {
    let logits = synth::logits(4, 5, 1.0, 11);
    for gpu in common::gpus("bad_targets_are_typed_errors") {
        for (bad, value) in [(5i64, 5i64), (-1, -1), (-101, -101)] {
            let targets = [0, 1, bad, 2];
            match gpu.cross_entropy(&logits, 5, &targets, &LossOptions::new()) {
                Err(Error::TargetOutOfRange { row: 2, value: v, classes: 5, .. }) => assert_eq!(v, value),
                other => panic!("expected TargetOutOfRange at row 2, got {other:?}"),
            }
        }
        let e = gpu.cross_entropy(&logits, 6, &[0i64, 1, 2, 3], &LossOptions::new()).unwrap_err();
        assert!(matches!(e, Error::Shape { got: 20, expected: 24, .. }), "{e}");
        // The context still works afterwards.
        let ok = gpu.cross_entropy(&logits, 5, &[0i64, 1, 2, 3], &LossOptions::new()).unwrap();
        assert!(ok.loss.unwrap().is_finite());
    }
}

#[test]
fn empty_and_degenerate_batches() {
    for gpu in common::gpus("empty_and_degenerate_batches") {
        let mean = gpu.cross_entropy(&[], 3, &[] as &[i64; 0], &LossOptions::new()).unwrap();
        assert!(mean.loss.unwrap().is_nan());
        let sum = gpu
            .cross_entropy(&[], 3, &[] as &[i64; 0], &LossOptions::new().reduction(Reduction::Sum))
            .unwrap();
        assert_eq!(sum.loss, Some(0.0));
        // V = 1: loss 0, gradient 0.
        let one = gpu.cross_entropy_with_grad(&[3.5, -2.0], 1, &[0i64, 0], &LossOptions::new()).unwrap();
        assert_eq!(one.loss, Some(0.0));
        assert_eq!(one.gradient, Some(vec![0.0, 0.0]));
    }
}

#[test]
fn repeated_calls_of_one_shape_allocate_nothing_new() {
    let (n, v) = (64, 32000);
    let logits = synth::logits(n, v, 2.0, 12);
    let targets = synth::targets(n, v, 12);
    let opts = LossOptions::new();
    for gpu in common::gpus("repeated_calls_allocate_nothing") {
        gpu.cross_entropy_with_grad(&logits, v, &targets, &opts).unwrap();
        let before = gpu.buffer_allocations();
        for _ in 0..3 {
            gpu.cross_entropy_with_grad(&logits, v, &targets, &opts).unwrap();
        }
        assert_eq!(gpu.buffer_allocations(), before, "steady state allocated on {}", common::name(gpu));
    }
}

#[test]
fn tiny_device_limits_exercise_every_chunking_path() {
    let Some(mut gpu) = common::tiny_device(common::gpus("tiny_device_limits")) else {
        return;
    };
    // (rows, classes, budget in 64 KiB chunks, chunks in flight):
    // 300 x 1000: 16 rows per chunk, folded dispatches, ragged tail.
    // 5000 x 3 and 9000 x 1: many rows per chunk, multi-level reductions.
    // 9 x 12000: one row per chunk. 3 x 40000 and 2 x 70001: rows split into pieces
    // (larger than a binding), ragged last piece. 4 x 5000 at a 3-chunk budget: the
    // budget, not the binding, forces smaller chunks.
    let cases = [
        (300usize, 1000usize, 16u64, 2usize),
        (5000, 3, 16, 3),
        (9000, 1, 16, 1),
        (9, 12000, 16, 2),
        (3, 40000, 16, 2),
        (2, 70001, 16, 3),
        (4, 5000, 3, 3),
    ];
    for (n, v, budget_chunks, ring) in cases {
        gpu.set_memory_budget(budget_chunks * (64 << 10));
        gpu.set_chunks_in_flight(ring);
        let plan = xent::gpu::Plan::new(n, v, xent::gpu::GradKind::Separate, &gpu.plan_limits()).unwrap();
        let logits = synth::logits(n, v, 2.0, 13);
        let mut targets = synth::targets(n, v, 13);
        targets[n / 3] = -100;
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let what = format!("{n}x{v} {reduction:?} {:?}", plan.layout);
            let opts = LossOptions::new().reduction(reduction);
            let want = Reference.evaluate(problem(&logits, v, &targets, EVERYTHING), &opts).unwrap();
            let got = gpu.evaluate(problem(&logits, v, &targets, EVERYTHING), &opts).unwrap();
            compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
            let mut in_place = logits.clone();
            let got = gpu.evaluate(in_place_problem(&mut in_place, v, &targets, EVERYTHING), &opts).unwrap();
            let got = LossOutput { gradient: Some(in_place), ..got };
            compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{what} in place: {e}"));
            let loss_only = LossOptions::new().reduction(reduction);
            let got = gpu.cross_entropy(&logits, v, &targets, &loss_only).unwrap();
            let want = Reference.cross_entropy(&logits, v, &targets, &loss_only).unwrap();
            compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{what} loss only: {e}"));
        }
    }
}

#[test]
fn streamed_results_are_bit_identical_run_to_run() {
    let Some(mut gpu) = common::tiny_device(common::gpus("streamed_results_are_bit_identical")) else {
        return;
    };
    gpu.set_memory_budget(3 * (64 << 10));
    let (n, v) = (500, 700);
    let logits = synth::logits(n, v, 2.0, 31);
    let targets = synth::targets(n, v, 31);
    let opts = LossOptions::new();
    let a = gpu.evaluate(problem(&logits, v, &targets, GRAD_ROWS), &opts).unwrap();
    for _ in 0..3 {
        let b = gpu.evaluate(problem(&logits, v, &targets, GRAD_ROWS), &opts).unwrap();
        assert_eq!(a.loss.map(f32::to_bits), b.loss.map(f32::to_bits));
        assert!(
            a.gradient
                .as_ref()
                .unwrap()
                .iter()
                .zip(b.gradient.as_ref().unwrap())
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
    }
}

#[test]
fn reference_is_its_own_backend() {
    // Through `&dyn Backend`, as the CLI and `xent check` hold it: the reference path
    // itself, with values worked out here by hand.
    let backend: &dyn xent::Backend = &Reference;
    assert_eq!(backend.describe(), "cpu reference (f64)");
    let logits = [2.0f32, 0.5, -1.0, 0.0, 0.0, 0.0];
    let targets = [0i64, 2];
    let problem = xent::Problem::new(xent::Logits::F32(&logits), 3, xent::Labels::from(&targets))
        .gradient(xent::Gradient::Owned)
        .row_losses(true);
    let out = backend.evaluate(problem, &LossOptions::new()).unwrap();
    let lse0 = (2.0f64.exp() + 0.5f64.exp() + (-1.0f64).exp()).ln();
    let rows = [lse0 - 2.0, 3.0f64.ln()];
    for (got, want) in out.row_losses.as_ref().unwrap().iter().zip(rows) {
        assert!((f64::from(*got) - want).abs() < 1e-7, "{got} vs {want}");
    }
    assert!((f64::from(out.loss.unwrap()) - (rows[0] + rows[1]) / 2.0).abs() < 1e-7);
    let grad = out.gradient.unwrap();
    for (c, x) in [2.0f64, 0.5, -1.0].into_iter().enumerate() {
        let want = ((x - lse0).exp() - f64::from(u8::from(c == 0))) / 2.0;
        assert!((f64::from(grad[c]) - want).abs() < 1e-7, "row 0 class {c}: {} vs {want}", grad[c]);
        let want = (1.0 / 3.0 - f64::from(u8::from(c == 2))) / 2.0;
        assert!((f64::from(grad[3 + c]) - want).abs() < 1e-7, "row 1 class {c}");
    }
}

#[test]
fn every_kernel_tuning_passes_the_conformance_set() {
    // The adapter picks its tuning; check the others on this adapter too, so that the
    // register-cached path, the streaming path, every workgroup shape, workgroups that
    // take several row groups in turn, and both row merges
    // (subgroup operations, taken where the adapter has SUBGROUP and one row fills the
    // workgroup as with Tuning::GPU for V > 4096, and the workgroup-memory tree) are
    // covered.
    let gpus = common::gpus("every_kernel_tuning_passes");
    let Some(first) = gpus.first() else { return };
    let adapter = common::adapter_of(first);
    let tunings = [
        xent::gpu::Tuning::GPU,
        xent::gpu::Tuning { subgroups: false, ..xent::gpu::Tuning::GPU },
        xent::gpu::Tuning::CPU,
        xent::gpu::Tuning {
            workgroup_size: 32,
            elems_per_thread: 1,
            max_threads_per_row: 1024,
            cached_per_thread: 256,
            subgroups: true,
            max_workgroups: 0,
            few_rows: 64,
            portable_f16: false,
        },
        xent::gpu::Tuning {
            workgroup_size: 128,
            elems_per_thread: 100_000,
            max_threads_per_row: 1024,
            cached_per_thread: 4,
            subgroups: true,
            max_workgroups: 0,
            few_rows: 0,
            portable_f16: true,
        },
        // Fewer workgroups than row groups: each takes several in turn (one workgroup
        // takes them all with the CPU tuning).
        xent::gpu::Tuning { max_workgroups: 3, ..xent::gpu::Tuning::GPU },
        xent::gpu::Tuning { max_workgroups: 1, ..xent::gpu::Tuning::CPU },
    ];
    let cases = conformance_cases();
    for tuning in tunings {
        let gpu = pollster::block_on(xent::GpuContext::from_adapter_tuned(&adapter, tuning)).unwrap();
        for case in &cases {
            case.verify(&gpu).unwrap_or_else(|e| panic!("{} with {tuning:?}: {e}", case.name));
        }
        // Both element widths on both paths.
        for (n, v) in [(5usize, 4099usize), (5, 4100), (3, 40000), (3, 40001), (70, 12)] {
            let logits = synth::logits(n, v, 3.0, 61);
            let targets = synth::targets(n, v, 61);
            let plain = LossOptions::new();
            // Every option through the same merges (label smoothing carries its own sum).
            let weights: Vec<f32> = (0..v).map(|c| 0.5 + (c % 7) as f32 * 0.25).collect();
            let every = plain.clone().weights(weights).label_smoothing(0.1).z_loss(1e-4).softcap(30.0);
            for (name, opts) in [("plain", plain), ("every option", every)] {
                let want = Reference.evaluate(problem(&logits, v, &targets, GRAD_ROWS), &opts).unwrap();
                let got = gpu.evaluate(problem(&logits, v, &targets, GRAD_ROWS), &opts).unwrap();
                compare(&got, &want, Tolerance::F32)
                    .unwrap_or_else(|e| panic!("{n}x{v} {tuning:?} {name}: {e}"));
            }
        }
    }
}

#[test]
fn every_option_through_split_rows_and_the_row_grid() {
    // Rows longer than a 64 KiB binding (column pieces) and few long rows (the row ×
    // block grid), with every option: the partial-state kernels carry them too. (Class
    // weights with split rows are unsupported on the GPU: they would not fit one binding
    // either.)
    let gpus = common::gpus("every_option_through_split_rows");
    let Some(tiny) = common::tiny_device(gpus) else { return };
    for (gpu, n, v) in [(&tiny, 3usize, 40000usize), (&gpus[0], 3, 20000), (&gpus[0], 5, 9000)] {
        let logits = synth::logits(n, v, 2.0, 57);
        let mut targets = synth::targets(n, v, 57);
        targets[1] = -100;
        let weights: Vec<f32> = (0..v).map(|c| 0.3 + (c % 7) as f32 / 4.0).collect();
        let split = v == 40000;
        for opts in [
            LossOptions::new().weights(weights.clone()).label_smoothing(0.1),
            LossOptions::new().label_smoothing(0.2),
            LossOptions::new().reduction(Reduction::Sum).z_loss(1e-3).softcap(6.0).logit_scale(0.9),
            LossOptions::new()
                .reduction(Reduction::None)
                .weights(weights.clone())
                .label_smoothing(0.3)
                .n_items(4.0),
            LossOptions::new().reduction(Reduction::None).label_smoothing(0.3).n_items(4.0).z_loss(1e-2),
        ] {
            if split && opts.get_weights().is_some() {
                let e = gpu.evaluate(problem(&logits, v, &targets, EVERYTHING), &opts).unwrap_err();
                assert!(matches!(e, Error::Unsupported { .. }), "{e}");
                continue;
            }
            let want = Reference.evaluate(problem(&logits, v, &targets, EVERYTHING), &opts).unwrap();
            let got = gpu.evaluate(problem(&logits, v, &targets, EVERYTHING), &opts).unwrap();
            compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{n}x{v} {opts:?}: {e}"));
        }
    }
}

#[test]
fn gradients_of_order_one_keep_the_f32_tolerance() {
    // `sum` with class weights: gradients up to 2.5, not scaled by 1/N, so atol 1e-6 is a
    // few ULP. Long rows on few invocations (CPU adapters) once summed them in one serial
    // chain and took p through log(sum), several ULP off; peaked rows (scale 6) make p
    // large where that shows.
    for (n, v) in [(64usize, 1000usize), (16, 4099), (8, 40000)] {
        let logits = synth::logits(n, v, 6.0, 97 + v as u64);
        let targets = synth::targets(n, v, 97);
        let weights: Vec<f32> = (0..v).map(|c| 0.5 + (c % 5) as f32 / 2.0).collect();
        let hard = LossOptions::new().reduction(Reduction::Sum).weights(weights.clone());
        verify(&logits, v, &targets, &hard, GRAD, &format!("{n}x{v} sum with weights"));
        verify(&logits, v, &targets, &hard.clone().label_smoothing(0.1), GRAD, &format!("{n}x{v} smoothing"));
        // Probability targets: a one-hot-ish distribution, the same scale of gradient.
        let probs: Vec<f32> = targets
            .iter()
            .flat_map(|&t| (0..v).map(move |c| if c as i64 == t { 0.9 } else { 0.1 / (v - 1) as f32 }))
            .collect();
        let soft = LossOptions::new().reduction(Reduction::Sum).weights(weights);
        let soft_problem =
            || Problem::new(Logits::F32(&logits), v, Labels::Probabilities(&probs)).gradient(Gradient::Owned);
        let want_soft = Reference.evaluate(soft_problem(), &soft).unwrap();
        let want_hard = Reference.cross_entropy_with_grad(&logits, v, &targets, &hard).unwrap();
        let gpus = common::gpus("gradients_of_order_one");
        let backends =
            std::iter::once(&xent::CpuFast as &dyn Backend).chain(gpus.iter().map(|g| g as &dyn Backend));
        for backend in backends {
            let got = backend.evaluate(soft_problem(), &soft).unwrap();
            compare(&got, &want_soft, Tolerance::F32)
                .unwrap_or_else(|e| panic!("{n}x{v} soft on {}: {e}", backend.describe()));
            let got = backend.cross_entropy_with_grad(&logits, v, &targets, &hard).unwrap();
            compare(&got, &want_hard, Tolerance::F32)
                .unwrap_or_else(|e| panic!("{n}x{v} on {}: {e}", backend.describe()));
        }
    }
}

/// Rows longer than 4 × 65535 classes with V odd (one element per load): each invocation
/// of the fused row kernel must stay under CPU adapters' 65535 loop iterations, or the
/// end of its part of the row is silently left unwritten (it was, at 64 × 300001).
#[test]
fn long_odd_rows_stay_within_the_loop_cap() {
    let gpus = common::gpus("long_odd_rows_stay_within_the_loop_cap");
    let (n, v) = (64, 262147);
    let x = xent::synth::logits(n, v, 2.0, 3);
    let t: Vec<i64> = (0..n).map(|r| ((r * 7919) % v) as i64).collect();
    let p = || Problem::new(Logits::F32(&x), v, Labels::from(&t[..])).gradient(Gradient::Owned);
    let want = Reference.evaluate(p(), &LossOptions::new()).unwrap();
    for gpu in gpus {
        let (got, dispatches) = xent::gpu::trace(|| gpu.evaluate(p(), &LossOptions::new()));
        assert!(dispatches.iter().any(|d| d.kernel.contains("cross_entropy_rows")), "{dispatches:?}");
        compare(&got.unwrap(), &want, Tolerance::F32)
            .unwrap_or_else(|e| panic!("{}: {e}", common::name(gpu)));
    }
}
