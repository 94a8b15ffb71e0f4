//! The `xent` command line: `info`, `check`, `eval`, `bench`.

use std::path::Path;

mod alloc;
mod args;
mod linear;
mod parallel;
use args::{Cli, Command, DeviceArg, EvalArgs};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use xent::npy::{self, NpyData};
use xent::{Backend, Error, GpuContext, Gradient, Labels, Logits, Problem, Reference, Targets};

/// Every heap allocation of the process is counted, so that `bench --linear` can say how
/// much memory a call held at its peak beyond its inputs and outputs.
#[global_allocator]
static ALLOCATOR: alloc::Counting = alloc::Counting;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info => info(),
        Command::Check { adapter } => check(adapter.as_deref()),
        Command::Eval(args) => eval(&args),
        Command::Bench(args) if args.linear => linear::bench(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(if e.is_bad_input() { 2 } else { 1 })
        }
    }
}

mod bench;
mod plot;

fn info() -> xent::Result<ExitCode> {
    let adapters = xent::gpu::select_adapters(None)?;
    for (i, a) in adapters.iter().enumerate() {
        let info = a.get_info();
        let l = a.limits();
        let f = a.features();
        println!("[{i}] {} ({:?}, {:?})", info.name, info.backend, info.device_type);
        println!("    driver: {} {}", info.driver, info.driver_info);
        println!(
            "    max_storage_buffer_binding_size: {} MiB, max_buffer_size: {} MiB, storage buffers per stage: {}",
            l.max_storage_buffer_binding_size >> 20,
            l.max_buffer_size >> 20,
            l.max_storage_buffers_per_shader_stage
        );
        println!(
            "    max_compute_workgroups_per_dimension: {}, max_compute_invocations_per_workgroup: {}, workgroup storage: {} KiB",
            l.max_compute_workgroups_per_dimension,
            l.max_compute_invocations_per_workgroup,
            l.max_compute_workgroup_storage_size >> 10
        );
        println!(
            "    min_storage_buffer_offset_alignment: {}, min_uniform_buffer_offset_alignment: {}",
            l.min_storage_buffer_offset_alignment, l.min_uniform_buffer_offset_alignment
        );
        let has = |x: wgpu::Features| if f.contains(x) { "yes" } else { "no" };
        println!(
            "    SUBGROUP: {}, SHADER_F16: {}, TIMESTAMP_QUERY: {}",
            has(wgpu::Features::SUBGROUP),
            has(wgpu::Features::SHADER_F16),
            has(wgpu::Features::TIMESTAMP_QUERY)
        );
        println!("    kernel tuning: {}", xent::gpu::Tuning::for_adapter(&info).within(&l));
    }
    Ok(ExitCode::SUCCESS)
}

fn check(adapter: Option<&str>) -> xent::Result<ExitCode> {
    let adapters = xent::gpu::select_adapters(adapter)?;
    let cases = xent::check::conformance_cases();
    println!("== {} ==", xent::CpuFast.describe());
    let mut failures = check_backend(&xent::CpuFast, &cases);
    for a in &adapters {
        let info = a.get_info();
        println!("\n== {} ({:?}) ==", info.name, info.backend);
        match GpuContext::from_adapter_blocking(a) {
            Ok(ctx) => failures += check_backend(&ctx, &cases),
            Err(e) => {
                println!("FAIL  could not open the adapter: {e}");
                failures += 1;
            }
        }
    }
    let verdict = if failures == 0 { "all passed".to_string() } else { format!("{failures} FAILED") };
    println!("\ncpu fast + {} adapters, {} cases each: {verdict}", adapters.len(), cases.len());
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Runs the conformance cases on one backend against the reference, prints a table,
/// returns the number of failures.
fn check_backend(backend: &dyn Backend, cases: &[xent::check::Case]) -> usize {
    println!("{:<28} {:>14}  {:<5} {:>10} {:>10}  detail", "case", "shape", "", "loss err", "grad err");
    let mut failures = 0;
    for case in cases {
        let shape = format!("{}x{}", case.rows(), case.classes);
        let t = Instant::now();
        match case.verify(backend) {
            Ok(a) => println!(
                "{:<28} {:>14}  {:<5} {:>10.3} {:>10.2e}  {:.0} ms",
                case.name,
                shape,
                "ok",
                a.loss_ratio,
                a.grad_err,
                t.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => {
                failures += 1;
                println!("{:<28} {:>14}  {:<5} {:>10} {:>10}  {e}", case.name, shape, "FAIL", "-", "-");
            }
        }
    }
    failures
}

/// Fails before any work when `path` cannot be created.
fn check_writable(path: &Path) -> xent::Result<()> {
    let tmp = npy::temp_path(path);
    std::fs::File::create(&tmp).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let _ = std::fs::remove_file(&tmp);
    Ok(())
}

fn eval(args: &EvalArgs) -> xent::Result<ExitCode> {
    let mut opts = args::eval_options(args)?;
    if let Some(mode) = args.parallel {
        return parallel::eval(args, opts, mode);
    }
    for p in args.outputs() {
        check_writable(p)?;
    }
    let logits_path = match &args.logits {
        Some(p) => p,
        None => return linear::eval(args, opts),
    };

    // The logits are memory-mapped and used in place: no copy, whatever their size
    // (Fortran-order files are transposed into memory once).
    let logits = npy::MappedNpy::open(logits_path)?;
    let (rows, classes) = match logits.header().shape[..] {
        [n, v] => (n, v),
        ref s => {
            return Err(Error::Npy {
                path: logits_path.clone(),
                message: format!("logits must be 2-D [N, V], got shape {s:?}"),
            });
        }
    };
    // float16 logits are read as raw bits and widened by the kernels (or the CPU paths).
    let half_data = match logits.header().dtype {
        npy::DType::F16 => Some(logits.as_f16_bits()?),
        _ => None,
    };
    let logits_data: &[f32] = match half_data {
        Some(_) => &[],
        None => logits.as_f32().map_err(|_| Error::Npy {
            path: logits_path.clone(),
            message: format!("logits must be float32 or float16, found {:?}", logits.header().dtype),
        })?,
    };
    let logits_len = rows * classes;
    if let Some(path) = &args.weights {
        opts = opts.weights(read_class_vector(path, "class weights")?);
    }
    if let Some(path) = &args.pos_weight {
        opts = opts.pos_weight(read_class_vector(path, "pos_weight")?);
    }
    // Float targets of the logits' shape (binary cross-entropy, or probabilities for
    // cross-entropy), memory-mapped too.
    let float_targets = args.loss_kind == args::LossKind::Bce || {
        let mut f = std::fs::File::open(&args.targets)
            .map_err(|source| Error::Io { path: args.targets.clone(), source })?;
        npy::read_header(&args.targets, &mut f)?.dtype == npy::DType::F32
    };
    let binary_targets = match float_targets {
        true => {
            let t = npy::MappedNpy::open(&args.targets)?;
            if t.header().shape != [rows, classes] {
                let what = if args.loss_kind == args::LossKind::Bce { "binary" } else { "probability" };
                return Err(Error::Npy {
                    path: args.targets.clone(),
                    message: format!(
                        "{what} targets must be float32 [N, V] = [{rows}, {classes}], got shape {:?}",
                        t.header().shape
                    ),
                });
            }
            Some(t)
        }
        false => None,
    };
    let soft = float_targets && args.loss_kind == args::LossKind::Ce;
    let targets = match binary_targets {
        Some(_) => None,
        None => Some(npy::read(&args.targets)?),
    };
    let targets_ref: Option<Targets<'_>> = match &targets {
        None => None,
        Some(targets) => {
            let t = class_targets(&args.targets, targets, "float targets: --loss-kind bce")?;
            if t.len() != rows {
                return Err(Error::Shape {
                    what: format!("targets ({} rows; logits have {rows})", t.len()),
                    got: t.len(),
                    expected: rows,
                });
            }
            Some(t)
        }
    };
    let binary_data = match &binary_targets {
        Some(t) => Some(t.as_f32()?),
        None => None,
    };
    // Every option and target is checked before the backend is opened.
    match (targets_ref, binary_data) {
        (Some(t), _) => {
            xent::Batch::new(logits_len, classes, t, &opts)?;
        }
        (None, Some(t)) if soft => {
            xent::check_soft(logits_len, t.len(), classes, &opts)?;
        }
        (None, Some(t)) => {
            xent::check_binary(logits_len, t.len(), classes, &opts)?;
        }
        (None, None) => unreachable!("targets of one kind or the other"),
    }

    let backend = open_backend(args)?;
    let adapter = backend.describe();
    // The gradient goes straight into a memory-mapped output file, renamed into place
    // only when everything succeeded.
    let mut grad_file = match &args.out_grad {
        Some(p) => Some(npy::NpyWriter::create(p, &[rows, classes])?),
        None => None,
    };
    let logits_view = match half_data {
        Some(bits) => Logits::Half(bits, xent::HalfFormat::F16),
        None => Logits::F32(logits_data),
    };
    let labels = match (targets_ref, binary_data) {
        (Some(t), _) => Labels::Classes(t),
        (None, Some(t)) if soft => Labels::Probabilities(t),
        (None, Some(t)) => Labels::Binary(t),
        (None, None) => unreachable!("targets of one kind or the other"),
    };
    let gradient = match &mut grad_file {
        Some(w) => Gradient::IntoF32(w.data_mut()),
        None => Gradient::None,
    };
    let start = Instant::now();
    let problem =
        Problem::new(logits_view, classes, labels).gradient(gradient).row_losses(args.plot.is_some());
    let out = backend.evaluate(problem, &opts)?;
    let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;

    if let Some(p) = &args.out_loss {
        let none_shape: &[usize] = if binary_data.is_some() && !soft { &[rows, classes] } else { &[rows] };
        match out.loss {
            Some(l) => npy::write_f32(p, &[], &[l])?,
            None => npy::write_f32(p, none_shape, out.row_losses.as_deref().unwrap_or_default())?,
        }
    }
    let metrics = metrics_outputs(args, &out)?;
    if let Some(w) = grad_file {
        w.commit()?;
    }
    let device = device_name(args.device);
    println!(
        "{{\"loss\": {}, \"z_loss\": {}, \"rows\": {rows}, \"classes\": {classes}, \"device\": \"{device}\", \"adapter\": {}, \"elapsed_ms\": {elapsed_ms:.3}{metrics}}}",
        out.loss.map_or("null".to_string(), json_number),
        out.z_loss.map_or("null".to_string(), json_number),
        json_string(&adapter)
    );
    Ok(ExitCode::SUCCESS)
}

/// `eval --metrics`: writes `--out-pred` (int64 [N]) and the `--plot` picture, and returns
/// the JSON's `, "metrics": {...}` (empty without --metrics).
pub(crate) fn metrics_outputs(args: &EvalArgs, out: &xent::LossOutput) -> xent::Result<String> {
    let Some(m) = &out.metrics else { return Ok(String::new()) };
    if let (Some(p), Some(pred)) = (&args.out_pred, &m.predictions) {
        npy::write_i64(p, pred)?;
    }
    if let Some(p) = &args.plot {
        plot::calibration_svg(p, m, out.row_losses.as_deref())?;
    }
    let num = |x: f64| json_number64(x);
    let top_k: Vec<String> = m.top_k_accuracy.iter().map(|(k, a)| format!("\"{k}\": {}", num(*a))).collect();
    Ok(format!(
        ", \"metrics\": {{\"accuracy\": {}, \"top_k_accuracy\": {{{}}}, \"nll\": {}, \"perplexity\": {}, \"entropy\": {}, \"ece\": {}, \"counted_rows\": {}}}",
        num(m.accuracy),
        top_k.join(", "),
        num(m.nll),
        num(m.perplexity),
        num(m.entropy),
        num(m.ece),
        m.counted_rows
    ))
}

/// `eval`'s backend: the GPU (the adapter named, or the default one; `--adapter all`:
/// the rows shared by every adapter), the fast CPU path or the reference.
pub(crate) fn open_backend(args: &EvalArgs) -> xent::Result<Box<dyn Backend>> {
    Ok(match args.device {
        DeviceArg::Gpu if args.adapter.as_deref() == Some("all") => {
            Box::new(xent::RowShards::adapters(None)?)
        }
        DeviceArg::Gpu => {
            let adapter = match &args.adapter {
                Some(name) => Some(xent::gpu::select_adapters(Some(name))?.remove(0)),
                None => None,
            };
            Box::new(match adapter {
                Some(a) => GpuContext::from_adapter_blocking(&a)?,
                None => GpuContext::new_blocking()?,
            })
        }
        DeviceArg::Cpu => Box::new(xent::CpuFast),
        DeviceArg::Reference => Box::new(Reference),
    })
}

/// The device's name in `eval`'s JSON.
pub(crate) fn device_name(device: DeviceArg) -> &'static str {
    match device {
        DeviceArg::Gpu => "gpu",
        DeviceArg::Cpu => "cpu",
        DeviceArg::Reference => "reference",
    }
}

/// The class-index targets of an array read from `path`: 1-D, int64 or int32 (`other`
/// says where float targets go instead).
pub(crate) fn class_targets<'a>(
    path: &Path,
    targets: &'a npy::NpyArray,
    other: &str,
) -> xent::Result<Targets<'a>> {
    if targets.shape.len() != 1 {
        return Err(Error::Npy {
            path: path.to_path_buf(),
            message: format!("class-index targets must be 1-D [N], got shape {:?}", targets.shape),
        });
    }
    match &targets.data {
        NpyData::I64(t) => Ok(t.into()),
        NpyData::I32(t) => Ok(t.into()),
        _ => Err(Error::Npy {
            path: path.to_path_buf(),
            message: format!("class-index targets must be int64 or int32 ({other})"),
        }),
    }
}

/// A per-class float32 vector [V] from a `.npy` file.
pub(crate) fn read_class_vector(path: &Path, what: &str) -> xent::Result<Vec<f32>> {
    let w = npy::read(path)?;
    if w.shape.len() != 1 {
        return Err(Error::Npy {
            path: path.to_path_buf(),
            message: format!("{what} must be 1-D [V], got shape {:?}", w.shape),
        });
    }
    match w.data {
        NpyData::F32(w) => Ok(w),
        _ => Err(Error::Npy { path: path.to_path_buf(), message: format!("{what} must be float32") }),
    }
}

/// A number as Python's `json` writes it (NaN and infinities included, which its
/// reader accepts).
pub(crate) fn json_number(x: f32) -> String {
    if x.is_finite() {
        return format!("{x:?}");
    }
    json_number64(f64::from(x))
}

/// [`json_number`] of an f64.
fn json_number64(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity".into() } else { "-Infinity".into() }
    } else {
        format!("{x:?}")
    }
}

pub(crate) fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
