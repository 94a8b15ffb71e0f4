//! The fast CPU path against the f64 reference.

use xent::check::{Tolerance, compare, conformance_cases};
use xent::{
    Backend, BackendExt, CpuFast, Gradient, Labels, Logits, LossOptions, LossOutput, Problem, Reduction,
    Reference, synth,
};

/// The loss against class indices with the rows and the LSE, the gradient where
/// `gradient` says.
fn problem<'a>(v: usize, targets: &'a [i64], logits: Logits<'a>, gradient: Gradient<'a>) -> Problem<'a> {
    Problem::new(logits, v, Labels::from(targets)).gradient(gradient).row_losses(true).lse(true)
}

#[test]
fn conformance_set_on_the_fast_cpu_path() {
    for case in conformance_cases() {
        case.verify(&CpuFast).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    }
}

#[test]
fn sweep_separate_into_and_in_place() {
    let mut seed = 500;
    for &v in &[1usize, 2, 15, 16, 17, 63, 64, 65, 1000, 4097, 32000, 131072] {
        for &n in &[1usize, 3, 70] {
            if n * v > 3_000_000 {
                continue;
            }
            seed += 1;
            let mut logits = synth::logits(n, v, 3.0, seed);
            if v > 4 {
                logits[v / 2] = f32::NEG_INFINITY; // a masked class in row 0
            }
            let mut targets = synth::targets(n, v, seed);
            if v > 4 && targets[0] as usize == v / 2 {
                targets[0] = 0;
            }
            if n > 2 {
                targets[1] = -100;
            }
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let what = format!("{n}x{v} {reduction:?}");
                let opts = LossOptions::new().reduction(reduction);
                let want = Reference
                    .evaluate(problem(v, &targets, Logits::F32(&logits), Gradient::Owned), &opts)
                    .unwrap();
                let got = CpuFast
                    .evaluate(problem(v, &targets, Logits::F32(&logits), Gradient::Owned), &opts)
                    .unwrap();
                compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
                let mut grad = vec![f32::NAN; n * v];
                let got = CpuFast
                    .evaluate(problem(v, &targets, Logits::F32(&logits), Gradient::IntoF32(&mut grad)), &opts)
                    .unwrap();
                compare(&LossOutput { gradient: Some(grad), ..got }, &want, Tolerance::F32)
                    .unwrap_or_else(|e| panic!("{what} into: {e}"));
                let mut in_place = logits.clone();
                let got = CpuFast
                    .evaluate(problem(v, &targets, Logits::F32Mut(&mut in_place), Gradient::InPlace), &opts)
                    .unwrap();
                compare(&LossOutput { gradient: Some(in_place), ..got }, &want, Tolerance::F32)
                    .unwrap_or_else(|e| panic!("{what} in place: {e}"));
            }
        }
    }
}

#[test]
fn result_does_not_depend_on_the_thread_count() {
    let (n, v) = (300, 5000);
    let logits = synth::logits(n, v, 2.0, 77);
    let targets = synth::targets(n, v, 77);
    let opts = LossOptions::new();
    let run = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| CpuFast.cross_entropy_with_grad(&logits, v, &targets, &opts).unwrap())
    };
    let (a, b) = (run(1), run(3));
    assert_eq!(a.loss.map(f32::to_bits), b.loss.map(f32::to_bits));
    assert_eq!(a.gradient, b.gradient);
}
