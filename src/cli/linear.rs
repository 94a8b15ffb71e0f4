//! The fused linear head + cross-entropy on the command line: `eval --hidden H.npy
//! --weight W.npy [--bias B.npy]` and `bench --linear`. Both go through the front door
//! (`Backend::evaluate` with `Problem::linear`), so every path is the same call.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use xent::gpu::HeadProduct;
use xent::gpu::bench::{Pass, Repeats, Samples, Timing};
use xent::npy::{self, DType, MappedNpy};
use xent::{
    Backend, Error, GpuContext, Gradient, GradientTo, HalfFormat, HeadGradients, LinearHead, LossOptions,
    Problem, Values,
};

use crate::args::{BenchArgs, BenchDevice, EvalArgs, OptionSet, PassArg};
use crate::{alloc, json_number, json_string};

/// A 2-D array's two sizes, or an error naming the file and the expected layout.
fn matrix(m: &MappedNpy, path: &Path, what: &str, layout: &str) -> xent::Result<(usize, usize)> {
    match m.header().shape[..] {
        [a, b] => Ok((a, b)),
        ref s => Err(Error::Npy {
            path: path.to_path_buf(),
            message: format!("{what} must be 2-D {layout}, got shape {s:?}"),
        }),
    }
}

/// The values of a mapped float32 or float16 array.
fn values<'a>(m: &'a MappedNpy, path: &Path, what: &str) -> xent::Result<Values<'a>> {
    match m.header().dtype {
        DType::F32 => Ok(Values::F32(m.as_f32()?)),
        DType::F16 => Ok(Values::Half(m.as_f16_bits()?, HalfFormat::F16)),
        other => Err(Error::Npy {
            path: path.to_path_buf(),
            message: format!("{what} must be float32 or float16, found {other:?}"),
        }),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::F32 => "float32",
        DType::F64 => "float64",
        DType::I32 => "int32",
        DType::I64 => "int64",
    }
}

/// Into the writer's mapped data, or not computed.
fn into(w: &mut Option<npy::NpyWriter>) -> GradientTo<'_> {
    match w {
        Some(w) => GradientTo::IntoF32(w.data_mut()),
        None => GradientTo::Skip,
    }
}

/// The linear head's input files, mapped, each checked against the others: `h` [N, D],
/// `W` [V, D] of the same type, `b` [V] (float32 or that type), class-index targets [N],
/// and the class weights read into the options.
pub(crate) struct HeadFiles {
    hidden: MappedNpy,
    weight: MappedNpy,
    bias: Option<MappedNpy>,
    targets: npy::NpyArray,
    pub rows: usize,
    pub dim: usize,
    pub classes: usize,
}

impl HeadFiles {
    pub(crate) fn open(args: &EvalArgs, opts: &mut LossOptions) -> xent::Result<Self> {
        let (hidden_path, weight_path) = match (&args.hidden, &args.weight) {
            (Some(h), Some(w)) => (h, w),
            _ => unreachable!("checked by eval_options"),
        };
        let (h_file, w_file) = (hidden_path.display(), weight_path.display());
        // Mapped and used in place (Fortran-order files are transposed into memory once).
        let hidden = MappedNpy::open(hidden_path)?;
        let weight = MappedNpy::open(weight_path)?;
        let (rows, dim) = matrix(&hidden, hidden_path, "hidden", "[N, D]")?;
        let (classes, w_dim) = matrix(&weight, weight_path, "weight", "[V, D]")?;
        if w_dim != dim {
            return Err(Error::Shape {
                what: format!(
                    "the hidden dimension D of weight {w_file} [V, D] = [{classes}, {w_dim}] \
                     (hidden {h_file} is [N, D] = [{rows}, {dim}])"
                ),
                got: w_dim,
                expected: dim,
            });
        }
        let (h_type, w_type) = (hidden.header().dtype, weight.header().dtype);
        if h_type != w_type {
            return Err(Error::InvalidOption(format!(
                "hidden {h_file} is {} but weight {w_file} is {}: give both in one type, float32 or float16",
                dtype_name(h_type),
                dtype_name(w_type)
            )));
        }
        values(&hidden, hidden_path, "hidden")?;
        values(&weight, weight_path, "weight")?;
        let bias = match &args.bias {
            Some(path) => {
                let b = MappedNpy::open(path)?;
                let len = match b.header().shape[..] {
                    [v] => v,
                    ref s => {
                        return Err(Error::Npy {
                            path: path.clone(),
                            message: format!("bias must be 1-D [V], got shape {s:?}"),
                        });
                    }
                };
                if len != classes {
                    return Err(Error::Shape {
                        what: format!(
                            "bias {} [V] = [{len}] (weight {w_file} has V = {classes} classes)",
                            path.display()
                        ),
                        got: len,
                        expected: classes,
                    });
                }
                let t = b.header().dtype;
                if t != DType::F32 && t != h_type {
                    return Err(Error::InvalidOption(format!(
                        "bias {} is {} but hidden {h_file} is {}: give the bias in float32 or in hidden's type",
                        path.display(),
                        dtype_name(t),
                        dtype_name(h_type)
                    )));
                }
                values(&b, path, "bias")?;
                Some(b)
            }
            None => None,
        };
        let targets_array = npy::read(&args.targets)?;
        let targets =
            crate::class_targets(&args.targets, &targets_array, "the linear head takes class indices")?;
        if targets.len() != rows {
            return Err(Error::Shape {
                what: format!(
                    "targets {} [N] = [{}] (hidden {h_file} has N = {rows} rows)",
                    args.targets.display(),
                    targets.len()
                ),
                got: targets.len(),
                expected: rows,
            });
        }
        if let Some(path) = &args.weights {
            *opts = opts.clone().weights(crate::read_class_vector(path, "class weights")?);
        }
        // The targets against V and the options (class weights' length among them), before
        // the backend is opened.
        xent::Batch::new(rows.saturating_mul(classes), classes, targets, opts)?;
        Ok(HeadFiles { hidden, weight, bias, targets: targets_array, rows, dim, classes })
    }

    /// `h`, `W`, `b` (checked in `open`).
    pub(crate) fn values(&self) -> (Values<'_>, Values<'_>, Option<Values<'_>>) {
        fn v(m: &MappedNpy) -> Values<'_> {
            values(m, Path::new(""), "").expect("checked in open")
        }
        (v(&self.hidden), v(&self.weight), self.bias.as_ref().map(v))
    }

    /// The class-index targets (checked in `open`).
    pub(crate) fn targets(&self) -> xent::Targets<'_> {
        match &self.targets.data {
            npy::NpyData::I64(t) => xent::Targets::I64(t),
            npy::NpyData::I32(t) => xent::Targets::I32(t),
            _ => unreachable!("checked in open"),
        }
    }
}

/// `xent eval --hidden H.npy --weight W.npy [--bias B.npy] --targets T.npy`: every input
/// is checked against the others before the backend is opened or any output created;
/// the gradients go straight into memory-mapped outputs, renamed into place only when
/// the whole call succeeded.
pub fn eval(args: &EvalArgs, mut opts: LossOptions) -> xent::Result<ExitCode> {
    let files = HeadFiles::open(args, &mut opts)?;
    let (rows, dim, classes) = (files.rows, files.dim, files.classes);
    let (h_values, w_values, b_values) = files.values();
    let targets = files.targets();
    let backend = crate::open_backend(args)?;
    let adapter = backend.describe();
    let writer = |p: &Option<PathBuf>, shape: &[usize]| {
        p.as_ref().map(|p| npy::NpyWriter::create(p, shape)).transpose()
    };
    let mut dh_file = writer(&args.out_grad_hidden, &[rows, dim])?;
    let mut dw_file = writer(&args.out_grad_weight, &[classes, dim])?;
    let mut db_file = writer(&args.out_grad_bias, &[classes])?;
    let grads =
        HeadGradients { hidden: into(&mut dh_file), weight: into(&mut dw_file), bias: into(&mut db_file) };
    let mut head = LinearHead::new(h_values, w_values, dim);
    if let Some(b) = b_values {
        head = head.bias(b);
    }
    let mut problem = Problem::linear(head, targets).row_losses(args.plot.is_some());
    if grads.any() {
        problem = problem.gradient(Gradient::Linear(grads));
    }
    let start = Instant::now();
    let out = backend.evaluate(problem, &opts)?;
    let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;

    if let Some(p) = &args.out_loss {
        match out.loss {
            Some(l) => npy::write_f32(p, &[], &[l])?,
            None => npy::write_f32(p, &[rows], out.row_losses.as_deref().unwrap_or_default())?,
        }
    }
    let metrics = crate::metrics_outputs(args, &out)?;
    for w in [dh_file, dw_file, db_file].into_iter().flatten() {
        w.commit()?;
    }
    println!(
        "{{\"loss\": {}, \"z_loss\": {}, \"rows\": {rows}, \"classes\": {classes}, \"hidden_dim\": {dim}, \"device\": \"{}\", \"adapter\": {}, \"elapsed_ms\": {elapsed_ms:.3}{metrics}}}",
        out.loss.map_or("null".to_string(), json_number),
        out.z_loss.map_or("null".to_string(), json_number),
        crate::device_name(args.device),
        json_string(&adapter)
    );
    Ok(ExitCode::SUCCESS)
}

/// Shapes (N, D, V) timed by default: sane for a CPU of a few cores too.
const LINEAR_SHAPES: &[(usize, usize, usize)] = &[(1024, 256, 8192), (4096, 512, 32000), (256, 4096, 32000)];
const WARMUP: usize = 2;

/// One measured line of `bench --linear`.
struct Row {
    device: &'static str,
    adapter: String,
    rows: usize,
    dim: usize,
    classes: usize,
    pass: Pass,
    /// "plain", or "metrics" (the loss with the evaluation metrics, `--metrics`).
    options: &'static str,
    samples: Samples,
    /// Heap bytes held at the peak of a call beyond what was held before it (the most
    /// over the timed calls; the warm-up's are left out).
    peak_heap: usize,
    /// GPU only: device bytes the context's allocations grew by from before the first
    /// call (warm-up included) to the most seen after any call: the buffers it keeps for
    /// the shape. From the wgpu allocator's report (Vulkan, DX12; `None` elsewhere). The
    /// head creates no buffer within a call that it does not keep (every one lives in the
    /// context's workspace, dW and db come back through a bounded staging buffer there),
    /// so what it keeps is its peak.
    peak_device: Option<u64>,
    /// GPU only: the head's products (logits, then with the backward dh and dW) by its
    /// GEMM kernel alone, of the same shape on the same adapter.
    gemm_ms: Option<Vec<f64>>,
}

impl Row {
    fn flop(&self) -> f64 {
        let nvd = self.rows as f64 * self.classes as f64 * self.dim as f64;
        nvd * match self.pass {
            Pass::Forward => 2.0,
            Pass::ForwardBackward => 6.0,
        }
    }
    fn gflop_per_s(&self) -> f64 {
        self.flop() / (self.samples.median() * 1e-3) / 1e9
    }
    fn peak_bytes(&self) -> u64 {
        self.peak_heap as u64 + self.peak_device.unwrap_or(0)
    }
    fn json(&self) -> String {
        let mut s = format!(
            "{{\"device\": \"{}\", \"adapter\": {}, \"rows\": {}, \"classes\": {}, \"pass\": \"{}\", \"options\": \"{}\", \"median_ms\": {:.6}, \"min_ms\": {:.6}, \"timing\": \"{}\", \"api\": \"host\", \"hidden_dim\": {}, \"gflop_per_s\": {:.4}, \"peak_bytes\": {}, \"peak_heap_bytes\": {}",
            self.device,
            json_string(&self.adapter),
            self.rows,
            self.classes,
            self.pass.name(),
            self.options,
            self.samples.median(),
            self.samples.min(),
            self.samples.timing.name(),
            self.dim,
            self.gflop_per_s(),
            self.peak_bytes(),
            self.peak_heap,
        );
        if self.device == "gpu" {
            s += &format!(
                ", \"peak_device_bytes\": {}",
                self.peak_device.map_or("null".to_string(), |b| b.to_string())
            );
            if let Some(each) = &self.gemm_ms {
                let g: f64 = each.iter().sum();
                let list = each.iter().map(|ms| format!("{ms:.6}")).collect::<Vec<_>>().join(", ");
                s += &format!(
                    ", \"gemm_ms\": {g:.6}, \"ratio_to_gemm\": {:.6}, \"gemm_products_ms\": [{list}]",
                    self.samples.median() / g
                );
            }
        }
        s + "}"
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<4} {:>6} {:>6} {:>7} {:<17} {:<8} {:>10} {:>10} {:>9} {:>12} {:>9} adapter",
        "dev",
        "rows",
        "dim",
        "classes",
        "pass",
        "options",
        "median ms",
        "min ms",
        "GFLOP/s",
        "peak MiB",
        "÷gemm"
    );
    for r in rows {
        println!(
            "{:<4} {:>6} {:>6} {:>7} {:<17} {:<8} {:>10.3} {:>10.3} {:>9.1} {:>12.1} {:>9} {}",
            r.device,
            r.rows,
            r.dim,
            r.classes,
            r.pass.name(),
            r.options,
            r.samples.median(),
            r.samples.min(),
            r.gflop_per_s(),
            r.peak_bytes() as f64 / (1u64 << 20) as f64,
            r.gemm_ms
                .as_ref()
                .map_or("-".to_string(), |g| format!("{:.2}x", r.samples.median() / g.iter().sum::<f64>())),
            r.adapter
        );
    }
    println!(
        "\nGFLOP/s: 2·N·V·D (forward) or 6·N·V·D (forward-backward: loss, dh, dW, db) over the median \
         time of the whole front-door call."
    );
    println!(
        "peak: heap bytes held at a call's peak beyond those held before it (a counting allocator; \
         inputs and outputs are allocated before), the most over the timed calls; on the GPU plus the \
         device allocations the context kept for the shape (wgpu's allocator report)."
    );
}

/// A deterministic head of shape (N, D, V): h ~ N(0, 1), W ~ N(0, 4/D) so that the
/// logits are ~ N(0, 4) like bench's, b ~ N(0, 0.25), uniform targets.
struct Synthetic {
    h: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    t: Vec<i64>,
}

impl Synthetic {
    fn new(n: usize, d: usize, v: usize) -> Self {
        Self {
            h: xent::synth::logits(n, d, 1.0, 42),
            w: xent::synth::logits(v, d, 2.0 / (d as f64).sqrt(), 43),
            b: xent::synth::logits(1, v, 0.5, 44),
            t: xent::synth::targets(n, v, 42),
        }
    }
}

/// Device bytes the context's allocator holds now (`None` where the backend says none).
fn device_bytes(ctx: &GpuContext) -> Option<u64> {
    ctx.device().generate_allocator_report().map(|r| r.total_allocated_bytes)
}

/// Times `iters` whole front-door calls (after the warm-up) of the head on `backend`,
/// with the heap peak of each call, and on the GPU the growth of the device allocations.
fn time_calls(
    backend: &dyn Backend,
    gpu: Option<&GpuContext>,
    s: &Synthetic,
    (n, d, v): (usize, usize, usize),
    pass: Pass,
    repeats: Repeats,
    metrics: bool,
) -> xent::Result<(Samples, usize, Option<u64>)> {
    let backward = pass == Pass::ForwardBackward;
    // The outputs exist (and are touched) before any call: they are not the call's memory.
    let mut dh = vec![0.0f32; if backward { n * d } else { 0 }];
    let mut dw = vec![0.0f32; if backward { v * d } else { 0 }];
    let mut db = vec![0.0f32; if backward { v } else { 0 }];
    let set = if metrics { OptionSet::Metrics } else { OptionSet::Plain };
    let opts = set.loss_options(v);
    let device_before = gpu.and_then(device_bytes);
    let (mut ms, mut peak_heap, mut device_after) = (Vec::with_capacity(repeats.iters), 0, device_before);
    for i in 0..repeats.total() {
        let head = LinearHead::new(Values::F32(&s.h), Values::F32(&s.w), d).bias(Values::F32(&s.b));
        let mut problem = Problem::linear(head, &s.t);
        if backward {
            problem = problem.gradient(Gradient::Linear(HeadGradients {
                hidden: GradientTo::IntoF32(&mut dh),
                weight: GradientTo::IntoF32(&mut dw),
                bias: GradientTo::IntoF32(&mut db),
            }));
        }
        let held = alloc::reset_peak();
        let start = Instant::now();
        let out = backend.evaluate(problem, &opts)?;
        let elapsed = start.elapsed().as_secs_f64() * 1e3;
        let call_peak = alloc::peak().saturating_sub(held);
        drop(out);
        if let Some(ctx) = gpu {
            device_after = device_after.max(device_bytes(ctx));
        }
        // The heap peak of the timed calls only: the warm-up's first call also holds the
        // process's one-time allocations (the thread pool, lazily built tables).
        if i >= repeats.warmup {
            ms.push(elapsed);
            peak_heap = peak_heap.max(call_peak);
        }
    }
    let peak_device = device_before.zip(device_after).map(|(b, a)| a.saturating_sub(b));
    Ok((Samples { ms, timing: Timing::Wall }, peak_heap, peak_device))
}

/// `xent bench --linear`.
pub fn bench(args: &BenchArgs) -> xent::Result<ExitCode> {
    if args.options.iter().any(|&o| o != OptionSet::Plain) {
        return Err(Error::InvalidOption(
            "--linear times the plain loss (and with --metrics the metrics beside it) only: leave out --options"
                .into(),
        ));
    }
    let shapes = match (args.rows, args.hidden_dim, args.classes) {
        (Some(n), Some(d), Some(v)) => vec![(n, d as usize, v)],
        (None, None, None) => LINEAR_SHAPES.to_vec(),
        _ => {
            return Err(Error::InvalidOption(
                "--linear takes --rows, --hidden-dim and --classes together (or none: the default shapes)"
                    .into(),
            ));
        }
    };
    let passes: &[Pass] = match args.pass {
        PassArg::Forward => &[Pass::Forward],
        PassArg::ForwardBackward => &[Pass::ForwardBackward],
        PassArg::All => &[Pass::Forward, Pass::ForwardBackward],
    };
    let want_cpu = args.device != BenchDevice::Gpu;
    let ctx = super::bench::open_gpu(args)?;
    let repeats = Repeats { warmup: WARMUP, iters: args.iters as usize };
    let mut rows = Vec::new();
    for &(n, d, v) in &shapes {
        let s = Synthetic::new(n, d, v);
        let mut devices: Vec<(&'static str, &dyn Backend, Option<&GpuContext>)> = Vec::new();
        if let Some(ctx) = &ctx {
            devices.push(("gpu", ctx, Some(ctx)));
        }
        if want_cpu {
            devices.push(("cpu", &xent::CpuFast, None));
        }
        let sets: &[bool] = if args.metrics { &[false, true] } else { &[false] };
        for (device, backend, gpu) in devices {
            for (&pass, &metrics) in passes.iter().flat_map(|p| sets.iter().map(move |m| (p, m))) {
                let (samples, peak_heap, peak_device) =
                    match time_calls(backend, gpu, &s, (n, d, v), pass, repeats, metrics) {
                        Ok(m) => m,
                        // `--device all` still measures the other device.
                        Err(e @ Error::Unsupported { .. }) if args.device == BenchDevice::All => {
                            eprintln!("skipping {device} {n}x{d}x{v} {}: {e}", pass.name());
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                // The floor: the same products by the head's own GEMM kernel on the same
                // adapter in this run, each in the layout the head runs it — h·Wᵀ forward,
                // and with the backward G·W and Gᵀ·h too.
                let gemm_ms = match gpu {
                    Some(g) => {
                        let products: &[HeadProduct] = match pass {
                            Pass::Forward => &[HeadProduct::Logits],
                            Pass::ForwardBackward => {
                                &[HeadProduct::Logits, HeadProduct::GradHidden, HeadProduct::GradWeight]
                            }
                        };
                        let mut each = Vec::new();
                        for &which in products {
                            each.push(g.bench_gemm(which, n, d, v, repeats.iters.max(1))?);
                        }
                        Some(each)
                    }
                    None => None,
                };
                rows.push(Row {
                    device,
                    adapter: backend.describe(),
                    rows: n,
                    dim: d,
                    classes: v,
                    pass,
                    options: if metrics { "metrics" } else { "plain" },
                    samples,
                    peak_heap,
                    peak_device,
                    gemm_ms,
                });
            }
        }
    }
    if args.json {
        println!("[{}]", rows.iter().map(Row::json).collect::<Vec<_>>().join(",\n "));
    } else {
        print_table(&rows);
    }
    Ok(ExitCode::SUCCESS)
}
