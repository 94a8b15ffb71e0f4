//! `xent bench`: GPU kernels against the in-run copy roofline, and the fast CPU path, on
//! synthetic batches (deterministic, no files).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use xent::gpu::bench::{GpuBench, Pass, Repeats, Samples, Timing};
use xent::{Backend, LossOptions};

/// One measured line of the report.
pub struct Row {
    pub device: &'static str,
    pub adapter: String,
    pub rows: usize,
    pub classes: usize,
    pub pass: Pass,
    pub samples: Samples,
    /// The roofline: copy (forward-backward) and read (forward) kernels, GPU only.
    pub copy_ms: Option<f64>,
    pub read_ms: Option<f64>,
    /// Host API per call, for the latency shapes.
    pub api: &'static str,
    /// The kernels' tuning as `XENT_*` variables (GPU rows; empty for the CPU).
    pub tuning: String,
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

    pub fn json(&self) -> String {
        let num = |x: Option<f64>| x.map_or("null".to_string(), |v| format!("{v:.6}"));
        let mut s = format!(
            "{{\"device\": \"{}\", \"adapter\": {}, \"rows\": {}, \"classes\": {}, \"pass\": \"{}\", \"median_ms\": {:.6}, \"min_ms\": {:.6}, \"gb_per_s\": {:.4}, \"elements_per_s\": {:.1}, \"timing\": \"{}\", \"api\": \"{}\"",
            self.device,
            crate::json_string(&self.adapter),
            self.rows,
            self.classes,
            self.pass.name(),
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
        "{:<4} {:>6} {:>7} {:<17} {:>10} {:>10} {:>8} {:>10} {:>9} {:>9} {:<9} {:<6} adapter",
        "dev",
        "rows",
        "classes",
        "pass",
        "median ms",
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
            "{:<4} {:>6} {:>7} {:<17} {:>10.3} {:>10.3} {:>8.2} {:>10.3} {:>9} {:>9} {:<9} {:<6} {}",
            r.device,
            r.rows,
            r.classes,
            r.pass.name(),
            r.samples.median(),
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
/// per-call latency of small problems (upload, kernels, readback).
pub fn host_calls(
    backend: &dyn Backend,
    logits: &[f32],
    targets: &[i64],
    classes: usize,
    pass: Pass,
    repeats: Repeats,
    tick: &mut dyn FnMut(),
) -> xent::Result<Samples> {
    let opts = LossOptions::new();
    let mut grad = vec![0.0f32; if pass == Pass::ForwardBackward { logits.len() } else { 0 }];
    let mut ms = Vec::new();
    for i in 0..repeats.total() {
        let start = Instant::now();
        let gradient = match pass {
            Pass::Forward => xent::Gradient::None,
            Pass::ForwardBackward => xent::Gradient::IntoF32(&mut grad),
        };
        let problem = xent::Problem::new(xent::Logits::F32(logits), classes, targets).gradient(gradient);
        backend.evaluate(problem, &opts)?;
        if i >= repeats.warmup {
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        tick();
    }
    Ok(Samples { ms, timing: Timing::Wall })
}

/// The GPU kernels on device-resident data, with the rooflines.
pub fn gpu_kernels(
    bench: &GpuBench<'_>,
    logits: &[f32],
    targets: &[i64],
    classes: usize,
    pass: Pass,
    repeats: Repeats,
    tick: &mut dyn FnMut(),
) -> xent::Result<(Samples, f64, Option<f64>)> {
    let t32: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
    let samples = bench.loss(logits, &t32, classes, pass, repeats, tick)?;
    let copy = bench.copy(logits.len(), repeats, tick)?.median();
    let read = match pass {
        Pass::Forward => Some(bench.read(logits.len(), repeats, tick)?.median()),
        Pass::ForwardBackward => None,
    };
    Ok((samples, copy, read))
}
