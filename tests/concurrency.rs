//! One context shared by many threads: `Send + Sync`, and correct results under load.

mod common;

use xent::check::{Tolerance, compare};
use xent::{
    Backend, GpuContext, Gradient, Labels, Logits, LossOptions, Problem, Reduction, Reference, synth,
};

/// The loss of f32 `logits` against class indices, with an owned gradient when `grad`.
fn problem<'a>(logits: &'a [f32], v: usize, targets: &'a [i64], grad: bool) -> Problem<'a> {
    Problem::new(Logits::F32(logits), v, Labels::from(targets)).gradient(if grad {
        Gradient::Owned
    } else {
        Gradient::None
    })
}

#[test]
fn the_context_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GpuContext>();
    assert_send_sync::<xent::gpu::DeviceLoss>();
}

#[test]
fn eight_threads_of_a_hundred_mixed_calls_on_one_context() {
    for gpu in common::gpus("eight_threads_of_a_hundred_mixed_calls") {
        // Inputs and reference results prepared up front: the threads only call the GPU.
        let shapes = [(1usize, 10usize), (7, 300), (33, 1000), (2, 9000), (64, 77), (5, 4096)];
        let cases: Vec<_> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(n, v))| {
                let logits = synth::logits(n, v, 2.0, 90 + i as u64);
                let targets = synth::targets(n, v, 90 + i as u64);
                let reduction = [Reduction::Mean, Reduction::Sum, Reduction::None][i % 3];
                let opts = LossOptions::new().reduction(reduction);
                let grad = i % 2 == 0;
                let want = Reference.evaluate(problem(&logits, v, &targets, grad), &opts).unwrap();
                (logits, targets, v, opts, grad, want)
            })
            .collect();
        std::thread::scope(|s| {
            for t in 0..8 {
                let cases = &cases;
                s.spawn(move || {
                    for k in 0..100 {
                        let (logits, targets, v, opts, grad, want) = &cases[(t * 7 + k) % cases.len()];
                        let got = gpu.evaluate(problem(logits, *v, targets, *grad), opts).unwrap();
                        compare(&got, want, Tolerance::F32)
                            .unwrap_or_else(|e| panic!("thread {t} call {k} on {}: {e}", common::name(gpu)));
                    }
                });
            }
        });
    }
}
