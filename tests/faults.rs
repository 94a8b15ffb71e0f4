//! GPU faults come back as typed errors, and the context (or a new one) works afterwards.

mod common;

use std::time::Duration;

use xent::check::{Tolerance, compare};
use xent::{
    Backend, BackendExt, Error, GpuContext, Gradient, Labels, Logits, LossOptions, Problem, Reference, synth,
};

fn adapters(test: &str) -> Vec<wgpu::Adapter> {
    common::gpus(test).iter().map(common::adapter_of).collect()
}

fn check(gpu: &GpuContext, n: usize, v: usize) {
    let logits = synth::logits(n, v, 2.0, 5);
    let targets = synth::targets(n, v, 5);
    let opts = LossOptions::new();
    let want = Reference.cross_entropy_with_grad(&logits, v, &targets, &opts).unwrap();
    let got = gpu.cross_entropy_with_grad(&logits, v, &targets, &opts).unwrap();
    compare(&got, &want, Tolerance::F32).unwrap();
}

#[test]
fn a_destroyed_device_is_a_typed_error_and_a_new_context_works() {
    for adapter in adapters("a_destroyed_device_is_a_typed_error") {
        let gpu = GpuContext::from_adapter_blocking(&adapter).unwrap();
        check(&gpu, 8, 100);
        // Destroy the device from another thread while a call is in flight.
        let (n, v) = (2000, 4096);
        let logits = synth::logits(n, v, 2.0, 6);
        let targets = synth::targets(n, v, 6);
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                gpu.destroy_device();
            });
            // Either it finished before the destruction, or it reports it; never a panic.
            match gpu.cross_entropy_with_grad(&logits, v, &targets, &LossOptions::new()) {
                Ok(out) => assert!(out.loss.is_some_and(f32::is_finite)),
                Err(e) => assert!(matches!(e, Error::DeviceLost(_) | Error::Gpu(_)), "{e}"),
            }
        });
        // Afterwards every call says the device is lost.
        let e = gpu.cross_entropy(&logits[..v], v, &targets[..1], &LossOptions::new()).unwrap_err();
        assert!(matches!(e, Error::DeviceLost(_)), "{e:?}");
        assert!(e.to_string().contains("new context"), "{e}");
        // A new context on the same adapter works.
        let again = GpuContext::from_adapter_blocking(&adapter).unwrap();
        check(&again, 8, 100);
    }
}

#[test]
fn out_of_memory_is_retried_with_smaller_chunks() {
    for adapter in adapters("out_of_memory_is_retried") {
        let gpu = GpuContext::from_adapter_blocking(&adapter).unwrap();
        // Two failures: the budget halves twice and the call still succeeds.
        gpu.inject_out_of_memory(2);
        check(&gpu, 300, 1000);
        // The in-place path too: nothing was written over the logits before the retry.
        gpu.inject_out_of_memory(1);
        let (n, v) = (50, 777);
        let logits = synth::logits(n, v, 2.0, 8);
        let targets = synth::targets(n, v, 8);
        let opts = LossOptions::new();
        let want = Reference.cross_entropy_with_grad(&logits, v, &targets, &opts).unwrap();
        let mut in_place = logits.clone();
        let problem = Problem::new(Logits::F32Mut(&mut in_place), v, Labels::from(&targets))
            .gradient(Gradient::InPlace);
        let got = gpu.evaluate(problem, &opts).unwrap();
        compare(&xent::LossOutput { gradient: Some(in_place), ..got }, &want, Tolerance::F32).unwrap();
        // Failures that do not stop: a typed error, and the context still works.
        gpu.inject_out_of_memory(1000);
        let e = gpu.cross_entropy(&logits, v, &targets, &opts).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(_)), "{e:?}");
        gpu.inject_out_of_memory(0);
        check(&gpu, 20, 300);
    }
}

#[test]
fn a_poll_timeout_is_a_typed_error_and_the_context_recovers() {
    for adapter in adapters("a_poll_timeout_is_a_typed_error") {
        let mut gpu = GpuContext::from_adapter_blocking(&adapter).unwrap();
        let (n, v) = (4000, 4096);
        let logits = synth::logits(n, v, 2.0, 7);
        let targets = synth::targets(n, v, 7);
        let opts = LossOptions::new();
        // A real 1 ns limit: a typed timeout, or done already where the adapter runs
        // submissions synchronously (lavapipe does).
        gpu.set_timeout(Duration::from_nanos(1));
        match gpu.cross_entropy_with_grad(&logits, v, &targets, &opts) {
            Err(Error::Timeout(d)) => assert_eq!(d, Duration::from_nanos(1)),
            Ok(out) => assert!(out.loss.is_some_and(f32::is_finite)),
            Err(e) => panic!("expected a timeout or a result, got {e}"),
        }
        gpu.set_timeout(Duration::from_secs(300));
        check(&gpu, 30, 500);
        // An injected timeout in the middle of the stream: typed, and the next call works.
        for at in [1, 3] {
            gpu.inject_timeout(at);
            let mut seen = 0;
            for _ in 0..at {
                match gpu.cross_entropy_with_grad(&logits, v, &targets, &opts) {
                    Err(Error::Timeout(_)) => seen += 1,
                    Ok(_) => {}
                    Err(e) => panic!("expected a timeout, got {e}"),
                }
            }
            assert!(seen >= 1, "no timeout reported");
            gpu.inject_timeout(0);
            check(&gpu, 30, 500);
        }
    }
}
