//! Probability targets and binary cross-entropy go through the host driver's plan and
//! ring, as class indices do: repeated calls of one shape create no buffer, an
//! out-of-memory while preparing is retried with half the budget, and many chunks in
//! flight under a small memory budget give the reference's result — the same numbers
//! whatever the ring's depth.

mod common;

use xent::check::{Tolerance, compare};
use xent::gpu::plan::Streamed;
use xent::gpu::{GradKind, Layout, Plan};
use xent::{
    Backend, Error, GpuContext, Gradient, Labels, Logits, LossOptions, LossOutput, Problem, Reduction,
    Upstream,
};

/// Contexts of their own (budgets and allocation counts are per context), one per adapter.
fn contexts(test: &str) -> Vec<GpuContext> {
    common::gpus(test)
        .iter()
        .map(|g| GpuContext::from_adapter_blocking(&common::adapter_of(g)).unwrap())
        .collect()
}

struct Data {
    classes: usize,
    logits: Vec<f32>,
    probs: Vec<f32>,
    binary: Vec<f32>,
    up_rows: Vec<f32>,
    up_elems: Vec<f32>,
}

impl Data {
    fn new(rows: usize, classes: usize, seed: u64) -> Self {
        let logits = xent::synth::logits(rows, classes, 2.0, seed);
        let u = xent::synth::logits(rows, classes, 1.0, seed + 1);
        let (probs, binary) = common::dense_targets(&u, classes);
        let up_rows = (0..rows).map(|r| 0.5 + (r % 5) as f32 * 0.25).collect();
        let up_elems = (0..rows * classes).map(|i| 0.25 + (i % 7) as f32 * 0.125).collect();
        Self { classes, logits, probs, binary, up_rows, up_elems }
    }
}

/// The calls of one label kind: fused with everything, the loss alone, and a backward.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Call {
    Fused,
    LossOnly,
    Backward,
}

fn evaluate(
    backend: &dyn Backend,
    d: &Data,
    binary: bool,
    call: Call,
    opts: &LossOptions,
) -> xent::Result<LossOutput> {
    let labels = if binary { Labels::Binary(&d.binary) } else { Labels::Probabilities(&d.probs) };
    let problem = Problem::new(Logits::F32(&d.logits), d.classes, labels);
    let problem = match call {
        Call::Fused => problem.gradient(Gradient::Owned).row_losses(true).lse(!binary),
        Call::LossOnly => problem,
        Call::Backward => {
            let upstream = match (opts.get_reduction(), binary) {
                (Reduction::None, true) => Upstream::PerElement(&d.up_elems),
                (Reduction::None, false) => Upstream::PerRow(&d.up_rows),
                _ => Upstream::Scalar(0.75),
            };
            // The backward of probability targets takes the LSE a forward saved.
            let lse = (!binary).then(|| {
                let p = Problem::new(Logits::F32(&d.logits), d.classes, Labels::Probabilities(&d.probs))
                    .lse(true);
                xent::Reference.evaluate(p, opts).unwrap().lse.unwrap()
            });
            let lse: &'static [f32] = lse.map_or(&[], |l| l.leak());
            problem.backward((!binary).then_some(lse), upstream)
        }
    };
    backend.evaluate(problem, opts)
}

fn option_sets(binary: bool, classes: usize) -> Vec<LossOptions> {
    let w: Vec<f32> = (0..classes).map(|c| 0.25 + (c % 4) as f32 * 0.5).collect();
    if binary {
        vec![
            LossOptions::new(),
            LossOptions::new().reduction(Reduction::Sum).weights(w.clone()).pos_weight(w),
            LossOptions::new().reduction(Reduction::None),
        ]
    } else {
        vec![
            LossOptions::new(),
            LossOptions::new().reduction(Reduction::Sum).weights(w).label_smoothing(0.1).z_loss(1e-3),
            LossOptions::new().reduction(Reduction::None).softcap(5.0),
        ]
    }
}

fn check_against_reference(gpu: &GpuContext, d: &Data, binary: bool, what: &str) {
    for opts in option_sets(binary, d.classes) {
        for call in [Call::Fused, Call::LossOnly, Call::Backward] {
            let want = evaluate(&xent::Reference, d, binary, call, &opts).unwrap();
            let got = evaluate(gpu, d, binary, call, &opts)
                .unwrap_or_else(|e| panic!("{what} {call:?} {:?}: {e}", opts.get_reduction()));
            compare(&got, &want, Tolerance::F32)
                .unwrap_or_else(|e| panic!("{what} {call:?} {:?}: {e}", opts.get_reduction()));
        }
    }
}

fn kinds() -> [(bool, &'static str); 2] {
    [(false, "probabilities"), (true, "binary")]
}

#[test]
fn repeated_calls_of_one_shape_create_no_buffer() {
    for mut gpu in contexts("repeated_soft_binary_calls_create_no_buffer") {
        // Several chunks, two in flight, and one call of one chunk.
        for (budget, ring) in [(256 << 10, 2), (1 << 30, 2)] {
            gpu.set_memory_budget(budget);
            gpu.set_chunks_in_flight(ring);
            let d = Data::new(200, 300, 3);
            for (binary, kind) in kinds() {
                let opts = LossOptions::new().reduction(Reduction::Sum);
                let calls = [Call::Fused, Call::LossOnly, Call::Backward];
                for call in calls {
                    evaluate(&gpu, &d, binary, call, &opts).unwrap();
                }
                let before = gpu.buffer_allocations();
                assert!(before > 0, "{kind}: buffers were counted");
                for _ in 0..3 {
                    for call in calls {
                        evaluate(&gpu, &d, binary, call, &opts).unwrap();
                    }
                }
                assert_eq!(gpu.buffer_allocations(), before, "{kind}, budget {budget}: a buffer was created");
            }
        }
    }
}

#[test]
fn an_out_of_memory_is_retried_for_probabilities_and_binary() {
    for gpu in contexts("an_out_of_memory_is_retried_for_soft_and_binary") {
        let d = Data::new(120, 500, 5);
        for (binary, kind) in kinds() {
            let opts = LossOptions::new();
            let want = evaluate(&xent::Reference, &d, binary, Call::Fused, &opts).unwrap();
            // Two failures: the budget halves twice and the call still succeeds.
            gpu.inject_out_of_memory(2);
            let got = evaluate(&gpu, &d, binary, Call::Fused, &opts).unwrap();
            compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{kind}: {e}"));
            // The backward too.
            gpu.inject_out_of_memory(1);
            let want = evaluate(&xent::Reference, &d, binary, Call::Backward, &opts).unwrap();
            let got = evaluate(&gpu, &d, binary, Call::Backward, &opts).unwrap();
            compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{kind} backward: {e}"));
            // Failures that do not stop: a typed error, and the context still works.
            gpu.inject_out_of_memory(1000);
            let e = evaluate(&gpu, &d, binary, Call::Fused, &opts).unwrap_err();
            assert!(matches!(e, Error::OutOfMemory(_)), "{kind}: {e:?}");
            gpu.inject_out_of_memory(0);
            let got = evaluate(&gpu, &d, binary, Call::LossOnly, &opts).unwrap();
            let want = evaluate(&xent::Reference, &d, binary, Call::LossOnly, &opts).unwrap();
            compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{kind} after: {e}"));
        }
    }
}

#[test]
fn many_chunks_in_flight_under_a_small_budget_match_the_reference() {
    for mut gpu in contexts("many_soft_binary_chunks_in_flight") {
        // (rows, classes, budget in KiB, chunks in flight): many chunks of many rows, of
        // one row, a ragged tail; binary rows longer than a slot are cut into pieces.
        let cases = [(300, 100, 96, 3), (7, 1000, 96, 5), (1000, 3, 16, 4), (9, 5000, 64, 2), (50, 64, 8, 1)];
        for (n, v, kib, ring) in cases {
            gpu.set_memory_budget(kib << 10);
            gpu.set_chunks_in_flight(ring);
            let d = Data::new(n, v, 11);
            for (binary, kind) in kinds() {
                let streamed = if binary {
                    Streamed::Binary { inputs: 3, outputs: 2 }
                } else {
                    Streamed::Probabilities(GradKind::Separate)
                };
                let plan = match Plan::streaming(n, v, streamed, &gpu.plan_limits()) {
                    Ok(plan) => plan,
                    Err(Error::InvalidOption(why)) if !binary => {
                        // Probability rows are never split: a budget that holds no row
                        // is the caller's error.
                        let e = evaluate(&gpu, &d, binary, Call::LossOnly, &LossOptions::new()).unwrap_err();
                        assert!(matches!(e, Error::InvalidOption(_)), "{kind} {n}x{v}: {e:?} ({why})");
                        continue;
                    }
                    Err(e) => panic!("{kind} {n}x{v}: {e}"),
                };
                assert!(plan.chunks().count() > ring, "{kind} {n}x{v}: {plan:?}");
                let what = format!("{kind} {n}x{v} in {kib} KiB, {ring} in flight, {:?}", plan.layout);
                check_against_reference(&gpu, &d, binary, &what);
            }
        }
        // Binary rows of 5000 over a 64 KiB budget are split.
        gpu.set_memory_budget(64 << 10);
        let plan = Plan::streaming(9, 5000, Streamed::Binary { inputs: 3, outputs: 2 }, &gpu.plan_limits());
        assert!(matches!(plan.unwrap().layout, Layout::Split { .. }));
    }
}

#[test]
fn the_depth_of_the_ring_does_not_change_the_numbers() {
    for mut gpu in contexts("the_depth_of_the_ring_does_not_change_soft_binary_numbers") {
        let d = Data::new(333, 257, 17);
        for (binary, kind) in kinds() {
            let opts = LossOptions::new().reduction(Reduction::Sum);
            let mut first: Option<LossOutput> = None;
            // The same slot budget, so the same chunks, with 1 to 4 of them in flight.
            for ring in 1..=4u64 {
                gpu.set_memory_budget(ring * (40 << 10));
                gpu.set_chunks_in_flight(ring as usize);
                let got = evaluate(&gpu, &d, binary, Call::Fused, &opts).unwrap();
                match &first {
                    None => first = Some(got),
                    Some(f) => {
                        assert_eq!(
                            got.loss.map(f32::to_bits),
                            f.loss.map(f32::to_bits),
                            "{kind}, ring {ring}"
                        );
                        assert_eq!(got.gradient, f.gradient, "{kind}, ring {ring}");
                        assert_eq!(got.row_losses, f.row_losses, "{kind}, ring {ring}");
                    }
                }
            }
        }
    }
}

#[test]
fn probability_rows_longer_than_a_binding_stay_unsupported() {
    let Some(gpu) = common::tiny_device(common::gpus("probability_rows_longer_than_a_binding")) else {
        return;
    };
    // A 64 KiB binding holds 16384 f32: one more class does not fit.
    let d = Data::new(2, 16400, 19);
    let e = evaluate(&gpu, &d, false, Call::LossOnly, &LossOptions::new()).unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e:?}");
    // Binary rows of that length are cut into pieces; their class weights do not fit a
    // binding either.
    for opts in option_sets(true, d.classes) {
        let weighted = opts.get_weights().is_some();
        for call in [Call::Fused, Call::LossOnly, Call::Backward] {
            let what = format!("binary 2x16400 on a 64 KiB binding, {call:?} {:?}", opts.get_reduction());
            match evaluate(&gpu, &d, true, call, &opts) {
                Err(Error::Unsupported { .. }) if weighted => {}
                Ok(got) if !weighted => {
                    let want = evaluate(&xent::Reference, &d, true, call, &opts).unwrap();
                    compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
                }
                other => panic!("{what}: {:?}", other.map(|o| o.loss)),
            }
        }
    }
}
