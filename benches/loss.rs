//! Criterion benches: the fast CPU path, the GPU kernels on device-resident data (GPU
//! time from timestamp queries where the adapter has them), the in-run copy and read
//! rooflines, and whole GPU host-API calls, over the same shapes as `xent bench`, with
//! throughput in bytes moved (1 read for forward, 2 reads + 1 write for
//! forward-backward).
//!
//! `cargo bench` (all), `cargo bench -- cpu` (one group). No GPU: the GPU groups are
//! skipped with a message.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use xent::gpu::bench::{GpuBench, Pass, Repeats};
use xent::{Backend, BackendExt, CpuFast, GpuContext, Gradient, Labels, Logits, LossOptions, Problem};

const SHAPES: &[(usize, usize)] = &[(256, 32000), (1024, 32000), (64, 131072), (4096, 4096)];
const PASSES: &[Pass] = &[Pass::Forward, Pass::ForwardBackward];

fn bytes(n: usize, v: usize, pass: Pass) -> u64 {
    (n * v * 4) as u64 * if pass == Pass::Forward { 1 } else { 3 }
}

fn data(n: usize, v: usize) -> (Vec<f32>, Vec<i64>) {
    (xent::synth::logits(n, v, 2.0, 42), xent::synth::targets(n, v, 42))
}

fn cpu(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu");
    group.sample_size(10).measurement_time(Duration::from_secs(3));
    for &(n, v) in SHAPES {
        let (logits, targets) = data(n, v);
        let mut grad = vec![0.0f32; n * v];
        for &pass in PASSES {
            group.throughput(Throughput::Bytes(bytes(n, v, pass)));
            let opts = LossOptions::new();
            group.bench_with_input(BenchmarkId::new(pass.name(), format!("{n}x{v}")), &pass, |b, &pass| {
                b.iter(|| match pass {
                    Pass::Forward => CpuFast.cross_entropy(&logits, v, &targets, &opts).unwrap(),
                    Pass::ForwardBackward => {
                        let problem = Problem::new(Logits::F32(&logits), v, Labels::from(&targets))
                            .gradient(Gradient::IntoF32(&mut grad));
                        CpuFast.evaluate(problem, &opts).unwrap()
                    }
                })
            });
        }
    }
    group.finish();
}

fn gpu(c: &mut Criterion) {
    let ctx = match GpuContext::new_blocking() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("skipping the GPU benches: {e}");
            return;
        }
    };
    let bench = GpuBench::new(&ctx).expect("bench kernels");
    let mut group = c.benchmark_group(format!("gpu {}", ctx.describe()));
    group.sample_size(10).measurement_time(Duration::from_secs(3));
    let gpu_time =
        |samples: xent::gpu::bench::Samples| Duration::from_secs_f64(samples.ms.iter().sum::<f64>() / 1e3);
    for &(n, v) in SHAPES {
        if !bench.fits(n, v) {
            continue;
        }
        let (logits, targets) = data(n, v);
        let t32: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
        for &pass in PASSES {
            group.throughput(Throughput::Bytes(bytes(n, v, pass)));
            let id = format!("{n}x{v}");
            group.bench_function(BenchmarkId::new(format!("kernels {}", pass.name()), &id), |b| {
                b.iter_custom(|iters| {
                    let r = Repeats { warmup: 1, iters: iters as usize };
                    gpu_time(bench.loss(&logits, &t32, v, pass, &LossOptions::new(), r, &mut || {}).unwrap())
                })
            });
            // The in-run roofline of the pass: a copy (1 read + 1 write) for the gradient,
            // a read for the loss alone.
            let (roofline, copy) = match pass {
                Pass::Forward => ("read roofline", false),
                Pass::ForwardBackward => ("copy roofline", true),
            };
            group.bench_function(BenchmarkId::new(roofline, &id), |b| {
                b.iter_custom(|iters| {
                    let r = Repeats { warmup: 1, iters: iters as usize };
                    let samples = if copy {
                        bench.copy(n * v, r, &mut || {})
                    } else {
                        bench.read(n * v, r, &mut || {})
                    };
                    gpu_time(samples.unwrap())
                })
            });
            let opts = LossOptions::new();
            group.bench_function(BenchmarkId::new(format!("host call {}", pass.name()), &id), |b| {
                b.iter(|| match pass {
                    Pass::Forward => ctx.cross_entropy(&logits, v, &targets, &opts).unwrap(),
                    Pass::ForwardBackward => {
                        ctx.cross_entropy_with_grad(&logits, v, &targets, &opts).unwrap()
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, cpu, gpu);
criterion_main!(benches);
