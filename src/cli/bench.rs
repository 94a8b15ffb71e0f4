//! `xent bench`: GPU kernels against the in-run copy roofline, and the fast CPU path, on
//! synthetic batches (deterministic, no files), under the option sets of `--options`
//! (each timed against the plain loss in the same run).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use xent::gpu::bench::{GpuBench, Pass, Repeats, Samples, Timing};
use xent::{Backend, Error, GpuContext, LossOptions};

use crate::args::{BenchArgs, BenchDevice, OptionSet, PassArg};

/// Shapes timed by default: realistic LLM vocabularies and a square one.
const BENCH_SHAPES: &[(usize, usize)] = &[(256, 32000), (1024, 32000), (64, 131072), (4096, 4096)];
/// Shapes whose whole host-API call is timed: the per-call latency of small problems.
const LATENCY_SHAPES: &[(usize, usize)] = &[(1, 32000), (64, 32000)];
const WARMUP: usize = 2;

impl OptionSet {
    /// The name on the command line and in the report.
    pub fn name(self) -> &'static str {
        match self {
            OptionSet::Plain => "plain",
            OptionSet::Smoothing => "smoothing",
            OptionSet::Softcap => "softcap",
            OptionSet::Weights => "weights",
            OptionSet::ZLoss => "z-loss",
            OptionSet::Scale => "scale",
            OptionSet::All => "all",
            OptionSet::Metrics => "metrics",
            OptionSet::SoftcapMetrics => "softcap-metrics",
        }
    }

    /// The loss options of the set for `classes` classes (`mean`, `ignore_index` −100).
    pub fn loss_options(self, classes: usize) -> LossOptions {
        // Deterministic class weights in [0.5, 1.4].
        let weights = || (0..classes).map(|c| 0.5 + (c % 10) as f32 * 0.1).collect::<Vec<f32>>();
        let o = LossOptions::new();
        match self {
            OptionSet::Plain => o,
            OptionSet::Smoothing => o.label_smoothing(0.1),
            OptionSet::Softcap => o.softcap(30.0),
            OptionSet::Weights => o.weights(weights()),
            OptionSet::ZLoss => o.z_loss(1e-4),
            OptionSet::Scale => o.logit_scale(0.5),
            OptionSet::All => o.weights(weights()).label_smoothing(0.1).softcap(30.0).z_loss(1e-4),
            OptionSet::Metrics => o.metrics(xent::MetricsSpec::new()),
            OptionSet::SoftcapMetrics => o.softcap(30.0).metrics(xent::MetricsSpec::new()),
        }
    }
}

/// One measured line of the report.
pub struct Row {
    pub device: &'static str,
    pub adapter: String,
    pub rows: usize,
    pub classes: usize,
    pub pass: Pass,
    /// The option set timed.
    pub options: OptionSet,
    pub samples: Samples,
    /// The roofline: copy (forward-backward) and read (forward) kernels, GPU only.
    pub copy_ms: Option<f64>,
    pub read_ms: Option<f64>,
    /// Host API per call, for the latency shapes.
    pub api: &'static str,
    /// The kernels' tuning as `XENT_*` variables (GPU rows; empty for the CPU).
    pub tuning: String,
    /// Median time over the plain loss's on the same device, API, shape and pass in this
    /// run (set by [`set_ratios_to_plain`]).
    pub ratio_to_plain: Option<f64>,
}

impl Row {
    fn elems(&self) -> f64 {
        self.rows as f64 * self.classes as f64
    }
    /// Bytes the pass must move at least: 1 read, or 2 reads + 1 write.
    fn bytes(&self) -> f64 {
        self.elems()
            * 4.0
            * match self.pass {
                Pass::Forward => 1.0,
                Pass::ForwardBackward => 3.0,
            }
    }
    fn gb_per_s(&self) -> f64 {
        self.bytes() / (self.samples.median() * 1e-3) / 1e9
    }
    fn ratio_to_copy(&self) -> Option<f64> {
        self.copy_ms.map(|c| self.samples.median() / c)
    }
    fn ratio_to_read(&self) -> Option<f64> {
        self.read_ms.map(|c| self.samples.median() / c)
    }

    /// The row as `--plot` draws it.
    pub fn point(&self) -> crate::plot::BenchPoint {
        crate::plot::BenchPoint {
            device: self.device.to_string(),
            adapter: self.adapter.clone(),
            rows: self.rows,
            classes: self.classes,
            pass: self.pass,
            options: self.options.name().to_string(),
            api: self.api.to_string(),
            median_ms: self.samples.median(),
            copy_ms: self.copy_ms,
            read_ms: self.read_ms,
        }
    }

    pub fn json(&self) -> String {
        let num = |x: Option<f64>| x.map_or("null".to_string(), |v| format!("{v:.6}"));
        let mut s = format!(
            "{{\"device\": \"{}\", \"adapter\": {}, \"rows\": {}, \"classes\": {}, \"pass\": \"{}\", \"options\": \"{}\", \"ratio_to_plain\": {}, \"median_ms\": {:.6}, \"min_ms\": {:.6}, \"gb_per_s\": {:.4}, \"elements_per_s\": {:.1}, \"timing\": \"{}\", \"api\": \"{}\"",
            self.device,
            crate::json_string(&self.adapter),
            self.rows,
            self.classes,
            self.pass.name(),
            self.options.name(),
            num(self.ratio_to_plain),
            self.samples.median(),
            self.samples.min(),
            self.gb_per_s(),
            self.elems() / (self.samples.median() * 1e-3),
            self.samples.timing.name(),
            self.api,
        );
        if self.device == "gpu" {
            s += &format!(
                ", \"copy_ms\": {}, \"ratio_to_copy\": {}, \"read_ms\": {}, \"ratio_to_read\": {}, \"tuning\": {}",
                num(self.copy_ms),
                num(self.ratio_to_copy()),
                num(self.read_ms),
                num(self.ratio_to_read()),
                crate::json_string(&self.tuning)
            );
        }
        s + "}"
    }
}

/// Prints the table.
pub fn print_table(rows: &[Row]) {
    println!(
        "{:<4} {:>6} {:>7} {:<17} {:<9} {:>10} {:>7} {:>10} {:>8} {:>10} {:>9} {:>9} {:<9} {:<6} adapter",
        "dev",
        "rows",
        "classes",
        "pass",
        "options",
        "median ms",
        "÷plain",
        "min ms",
        "GB/s",
        "Gelem/s",
        "÷copy",
        "÷read",
        "timing",
        "api"
    );
    for r in rows {
        let ratio = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}x"));
        println!(
            "{:<4} {:>6} {:>7} {:<17} {:<9} {:>10.3} {:>7} {:>10.3} {:>8.2} {:>10.3} {:>9} {:>9} {:<9} {:<6} {}",
            r.device,
            r.rows,
            r.classes,
            r.pass.name(),
            r.options.name(),
            r.samples.median(),
            ratio(r.ratio_to_plain),
            r.samples.min(),
            r.gb_per_s(),
            r.elems() / (r.samples.median() * 1e-3) / 1e9,
            ratio(r.ratio_to_copy()),
            ratio(r.ratio_to_read()),
            r.samples.timing.name(),
            r.api,
            r.adapter
        );
    }
}

/// A progress bar that appears only once the run has taken about a second.
pub struct Progress {
    bar: ProgressBar,
    start: Instant,
    shown: bool,
}

impl Progress {
    pub fn new(total: u64) -> Self {
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Self { bar, start: Instant::now(), shown: false }
    }
    pub fn message(&self, msg: String) {
        self.bar.set_message(msg);
    }
    pub fn tick(&mut self) {
        self.bar.inc(1);
        if !self.shown && self.start.elapsed() > Duration::from_secs(1) {
            self.shown = true;
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
    }
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Times whole API calls with the host clock: the fast CPU path, and on the GPU the
/// per-call latency of small problems (upload, kernels, readback), under each of `opts`.
/// The option sets take turns, one call each per round (after the warm-up rounds), so
/// that a change of the machine's load during the run weighs on all of them alike and
/// their ratios stay fair.
#[allow(clippy::too_many_arguments)]
pub fn host_calls(
    backend: &dyn Backend,
    logits: &[f32],
    targets: &[i64],
    classes: usize,
    pass: Pass,
    opts: &[LossOptions],
    repeats: Repeats,
    tick: &mut dyn FnMut(),
) -> xent::Result<Vec<Samples>> {
    let mut grad = vec![0.0f32; if pass == Pass::ForwardBackward { logits.len() } else { 0 }];
    let mut ms = vec![Vec::with_capacity(repeats.iters); opts.len()];
    for i in 0..repeats.total() {
        for (o, ms) in opts.iter().zip(&mut ms) {
            let start = Instant::now();
            let gradient = match pass {
                Pass::Forward => xent::Gradient::None,
                Pass::ForwardBackward => xent::Gradient::IntoF32(&mut grad),
            };
            let problem = xent::Problem::new(xent::Logits::F32(logits), classes, targets).gradient(gradient);
            backend.evaluate(problem, o)?;
            if i >= repeats.warmup {
                ms.push(start.elapsed().as_secs_f64() * 1e3);
            }
            tick();
        }
    }
    Ok(ms.into_iter().map(|ms| Samples { ms, timing: Timing::Wall }).collect())
}

/// The in-run rooflines of a pass on the GPU: the copy, and for the loss alone the read.
pub fn gpu_rooflines(
    bench: &GpuBench<'_>,
    elems: usize,
    pass: Pass,
    repeats: Repeats,
    tick: &mut dyn FnMut(),
) -> xent::Result<(f64, Option<f64>)> {
    let copy = bench.copy(elems, repeats, tick)?.median();
    let read = match pass {
        Pass::Forward => Some(bench.read(elems, repeats, tick)?.median()),
        Pass::ForwardBackward => None,
    };
    Ok((copy, read))
}

/// Sets each row's [`Row::ratio_to_plain`] from the plain row of the same device, API,
/// shape and pass.
pub fn set_ratios_to_plain(rows: &mut [Row]) {
    let plain: Vec<(usize, f64)> = rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.options == OptionSet::Plain)
        .map(|(i, r)| (i, r.samples.median()))
        .collect();
    for i in 0..rows.len() {
        let r = &rows[i];
        let base = plain.iter().find(|&&(j, _)| {
            let p = &rows[j];
            (p.device, p.api, p.rows, p.classes, p.pass) == (r.device, r.api, r.rows, r.classes, r.pass)
        });
        rows[i].ratio_to_plain = base.map(|&(_, ms)| rows[i].samples.median() / ms);
    }
}

/// `xent bench`.
/// The GPU context a bench asks for (`--device gpu|all`, `--adapter`), or `None` for
/// `--device cpu` — and for `--device all` on a machine without an adapter, which still
/// measures the CPU.
pub fn open_gpu(args: &BenchArgs) -> xent::Result<Option<GpuContext>> {
    let opened = match (args.device != BenchDevice::Cpu, &args.adapter) {
        (false, _) => return Ok(None),
        (true, Some(name)) => {
            xent::gpu::select_adapters(Some(name)).and_then(|a| GpuContext::from_adapter_blocking(&a[0]))
        }
        (true, None) => GpuContext::new_blocking(),
    };
    match opened {
        Ok(mut ctx) => {
            if let Some(mib) = args.memory_budget {
                ctx.set_memory_budget(mib << 20);
            }
            Ok(Some(ctx))
        }
        Err(e @ Error::NoAdapter { .. }) if args.device == BenchDevice::All => {
            eprintln!("warning: {e}\nmeasuring the CPU path only");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

pub fn run(args: &BenchArgs) -> xent::Result<ExitCode> {
    let passes: &[Pass] = match args.pass {
        PassArg::Forward => &[Pass::Forward],
        PassArg::ForwardBackward => &[Pass::ForwardBackward],
        PassArg::All => &[Pass::Forward, Pass::ForwardBackward],
    };
    // The option sets in command-line order, each once, the plain loss first (measured
    // even when not listed: it is what the ratios divide by).
    let mut sets = vec![OptionSet::Plain];
    let metrics = args.metrics.then_some(OptionSet::Metrics);
    for &s in args.options.iter().chain(&metrics) {
        if !sets.contains(&s) {
            sets.push(s);
        }
    }
    let cpu = args.device != BenchDevice::Gpu;
    let (shapes, latency): (Vec<_>, Vec<_>) = match (args.rows, args.classes) {
        (Some(n), Some(v)) => (vec![(n, v)], vec![]),
        _ => (BENCH_SHAPES.to_vec(), LATENCY_SHAPES.to_vec()),
    };
    let ctx = open_gpu(args)?;
    let gpu = ctx.is_some();
    let gpu_bench = ctx.as_ref().map(GpuBench::new).transpose()?;
    let repeats = Repeats { warmup: WARMUP, iters: args.iters as usize };
    let per = repeats.total() as u64;
    let sets_n = sets.len() as u64;
    // Per shape and pass: on the GPU the loss under each set and the two rooflines once.
    let gpu_ticks = if gpu { (sets_n + 2) * per } else { 0 };
    let total = (shapes.len() + latency.len()) as u64
        * passes.len() as u64
        * (gpu_ticks + u64::from(cpu) * sets_n * per);
    let mut progress = Progress::new(total);
    let mut rows = Vec::new();
    let adapter = ctx.as_ref().map(|c| c.describe()).unwrap_or_default();
    let tuning = ctx.as_ref().map(|c| c.tuning().to_string()).unwrap_or_default();
    // Every GPU measurement first, then the CPU ones: lavapipe's dispatches run on a
    // host thread, so CPU work nearby (rayon's workers winding down) would skew them.
    for phase in ["gpu", "cpu"] {
        for (i, &(n, v)) in shapes.iter().chain(&latency).enumerate() {
            if (phase == "gpu" && ctx.is_none()) || (phase == "cpu" && !cpu) {
                continue;
            }
            let host_api = i >= shapes.len();
            progress.message(format!("{n}x{v}: generating"));
            let logits = xent::synth::logits(n, v, 2.0, 42);
            let targets = xent::synth::targets(n, v, 42);
            let t32: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
            for &pass in passes {
                let row = |device, options, samples, copy_ms, read_ms, api, tuning: &str| Row {
                    device,
                    adapter: if device == "gpu" { adapter.clone() } else { xent::CpuFast.describe() },
                    rows: n,
                    classes: v,
                    pass,
                    options,
                    samples,
                    copy_ms,
                    read_ms,
                    api,
                    tuning: tuning.to_string(),
                    ratio_to_plain: None,
                };
                if let (Some(ctx), Some(b), "gpu") = (&ctx, &gpu_bench, phase) {
                    if !host_api && !b.fits(n, v) {
                        eprintln!(
                            "skipping gpu {n}x{v}: larger than one device buffer ({} MiB)",
                            ctx.limits().max_buffer_size >> 20
                        );
                        continue;
                    }
                    let (copy, read) = if host_api {
                        (None, None)
                    } else {
                        progress.message(format!("{n}x{v} {} gpu rooflines", pass.name()));
                        let (copy, read) = gpu_rooflines(b, n * v, pass, repeats, &mut || progress.tick())?;
                        (Some(copy), read)
                    };
                    // A set the device-resident recording does not take is timed through
                    // the host API instead (and the plain loss with it, for its ratio).
                    let mut host_sets = if host_api { sets.clone() } else { Vec::new() };
                    for &set in sets.iter().filter(|_| !host_api) {
                        progress.message(format!("{n}x{v} {} {} gpu", pass.name(), set.name()));
                        let opts = set.loss_options(v);
                        match b.loss(&logits, &t32, v, pass, &opts, repeats, &mut || progress.tick()) {
                            Ok(samples) => rows.push(row("gpu", set, samples, copy, read, "device", &tuning)),
                            Err(e @ Error::Unsupported { .. }) => {
                                eprintln!(
                                    "gpu {n}x{v} {} {}: {e}; timing the host API",
                                    pass.name(),
                                    set.name()
                                );
                                host_sets.push(set);
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    if !host_sets.is_empty() && host_sets[0] != OptionSet::Plain {
                        host_sets.insert(0, OptionSet::Plain);
                    }
                    if !host_sets.is_empty() {
                        progress.message(format!("{n}x{v} {} gpu host API", pass.name()));
                        let opts: Vec<_> = host_sets.iter().map(|s| s.loss_options(v)).collect();
                        let mut tick = || progress.tick();
                        let samples = host_calls(ctx, &logits, &targets, v, pass, &opts, repeats, &mut tick)?;
                        for (set, samples) in host_sets.into_iter().zip(samples) {
                            rows.push(row("gpu", set, samples, None, None, "host", &tuning));
                        }
                    }
                }
                if phase == "cpu" {
                    progress.message(format!("{n}x{v} {} cpu", pass.name()));
                    let opts: Vec<_> = sets.iter().map(|s| s.loss_options(v)).collect();
                    let mut tick = || progress.tick();
                    let samples =
                        host_calls(&xent::CpuFast, &logits, &targets, v, pass, &opts, repeats, &mut tick)?;
                    for (&set, samples) in sets.iter().zip(samples) {
                        rows.push(row("cpu", set, samples, None, None, "host", ""));
                    }
                }
            }
        }
    }
    progress.finish();
    set_ratios_to_plain(&mut rows);
    if args.json {
        println!("[{}]", rows.iter().map(Row::json).collect::<Vec<_>>().join(",\n "));
    } else {
        print_table(&rows);
        if rows.iter().any(|r| r.device == "gpu") {
            println!(
                "\n÷copy: GPU time over an in-run copy kernel moving N×V f32 once each way (1 read + 1 write);"
            );
            println!(
                "÷read: loss-only time over an in-run read-only reduction of the same bytes. api device: kernels on"
            );
            println!(
                "data already on the GPU; api host: whole calls from host memory (upload + kernels + readback)."
            );
            println!("GPU kernels' tuning: {tuning}");
        }
        if sets.len() > 1 {
            println!(
                "÷plain: median time over the plain loss's on the same device, API, shape and pass in this run."
            );
        }
    }
    if let Some(path) = &args.plot {
        crate::plot::bench_svg(path, &rows.iter().map(Row::point).collect::<Vec<_>>())?;
    }
    Ok(ExitCode::SUCCESS)
}
