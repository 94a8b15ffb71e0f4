//! `xent eval --parallel rows|vocab` under `mpirun`: every rank maps the same input files,
//! takes its block of rows or of the vocabulary's columns, and evaluates it through
//! [`xent::parallel`]; rank 0 prints the JSON. An output file is created by rank 0 under a
//! temporary name, filled by every rank in its part, and renamed into place only after
//! every rank has succeeded; a failure anywhere leaves no file behind.

use std::process::ExitCode;
#[cfg(feature = "mpi")]
use std::time::Instant;

use xent::LossOptions;
#[cfg(feature = "mpi")]
use xent::collective::{Collective, Metered, agree};
#[cfg(feature = "mpi")]
use xent::npy::{self, NpyWriter};
#[cfg(feature = "mpi")]
use xent::{Error, Gradient, Labels, Logits, Problem, Reduction, Targets, Values};

use crate::args::{EvalArgs, ParallelArg};

/// Runs `eval` as one rank of the MPI job.
#[cfg(not(feature = "mpi"))]
pub fn eval(_: &EvalArgs, _: LossOptions, _: ParallelArg) -> xent::Result<ExitCode> {
    Err(xent::Error::InvalidOption(
        "--parallel runs under mpirun and needs xent built with the mpi feature (cargo build --features \
         mpi; Debian: apt-get install openmpi-bin libopenmpi-dev libclang-dev)"
            .into(),
    ))
}

/// Runs `eval` as one rank of the MPI job.
#[cfg(feature = "mpi")]
pub fn eval(args: &EvalArgs, opts: LossOptions, mode: ParallelArg) -> xent::Result<ExitCode> {
    if !(args.rank_timeout > 0.0 && args.rank_timeout.is_finite()) {
        return Err(Error::InvalidOption(format!(
            "--rank-timeout must be a positive number of seconds, got {}",
            args.rank_timeout
        )));
    }
    let mpi =
        xent::collective::Mpi::init_with_timeout(std::time::Duration::from_secs_f64(args.rank_timeout))?;
    // A rank that panics ends the job at once rather than leaving the others waiting
    // (its temporary output files removed first: an abort runs no destructor).
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        hook(info);
        npy::remove_live_temps();
        mpi::traits::Communicator::abort(&mpi::topology::SimpleCommunicator::world(), 70);
    }));
    let metered = Metered::new(&mpi);
    let json = run(&metered, args, opts, mode)?;
    if metered.rank() == 0 {
        println!("{json}");
    }
    Ok(ExitCode::SUCCESS)
}

/// What a rank reads before anything is exchanged: the mapped logits and the targets.
#[cfg(feature = "mpi")]
struct Inputs {
    logits: npy::MappedNpy,
    targets: npy::NpyArray,
    rows: usize,
    classes: usize,
}

#[cfg(feature = "mpi")]
impl Inputs {
    fn open(args: &EvalArgs, opts: &mut LossOptions) -> xent::Result<Self> {
        let usage = |m: &str| Err(Error::InvalidOption(m.into()));
        let Some(path) = &args.logits else { unreachable!("the linear head goes to run_head") };
        if args.loss_kind != crate::args::LossKind::Ce {
            return usage("--parallel takes class-index targets (--loss-kind ce)");
        }
        let logits = npy::MappedNpy::open(path)?;
        let (rows, classes) = match logits.header().shape[..] {
            [n, v] => (n, v),
            ref s => {
                return Err(Error::Npy {
                    path: path.clone(),
                    message: format!("logits must be 2-D [N, V], got shape {s:?}"),
                });
            }
        };
        if !matches!(logits.header().dtype, npy::DType::F32 | npy::DType::F16) {
            return Err(Error::Npy {
                path: path.clone(),
                message: format!("logits must be float32 or float16, found {:?}", logits.header().dtype),
            });
        }
        let targets = npy::read(&args.targets)?;
        let t = crate::class_targets(&args.targets, &targets, "--parallel takes class indices")?;
        if t.len() != rows {
            return Err(Error::Shape {
                what: format!("targets ({} rows; logits have {rows})", t.len()),
                got: t.len(),
                expected: rows,
            });
        }
        if let Some(p) = &args.weights {
            *opts = opts.clone().weights(crate::read_class_vector(p, "class weights")?);
        }
        opts.validate(classes)?;
        Ok(Inputs { logits, targets, rows, classes })
    }

    fn targets(&self) -> Targets<'_> {
        match &self.targets.data {
            npy::NpyData::I64(t) => Targets::I64(t),
            npy::NpyData::I32(t) => Targets::I32(t),
            _ => unreachable!("checked in open"),
        }
    }

    /// The logits of rows `r`.
    fn rows_of(&self, r: std::ops::Range<usize>) -> xent::Result<Logits<'_>> {
        let e = r.start * self.classes..r.end * self.classes;
        Ok(match self.logits.header().dtype {
            npy::DType::F16 => Logits::Half(&self.logits.as_f16_bits()?[e], xent::HalfFormat::F16),
            _ => Logits::F32(&self.logits.as_f32()?[e]),
        })
    }

    /// Columns `cols` of every row, as f32 (float16 widened exactly), copied on every
    /// thread.
    fn columns_of(&self, cols: std::ops::Range<usize>) -> xent::Result<Vec<f32>> {
        use rayon::prelude::*;
        let (v, w) = (self.classes.max(1), cols.len());
        let mut out = vec![0.0f32; self.rows * w];
        if w == 0 {
            return Ok(out);
        }
        let rows = out.par_chunks_mut(w);
        match self.logits.header().dtype {
            npy::DType::F16 => {
                let f = xent::HalfFormat::F16;
                rows.zip(self.logits.as_f16_bits()?.par_chunks(v)).for_each(|(o, row)| {
                    o.iter_mut().zip(&row[cols.clone()]).for_each(|(o, &h)| *o = f.to_f32(h));
                });
            }
            _ => rows
                .zip(self.logits.as_f32()?.par_chunks(v))
                .for_each(|(o, row)| o.copy_from_slice(&row[cols.clone()])),
        }
        Ok(out)
    }
}

/// An output file of the whole job: rank 0 creates it, the others join it once it is there.
#[cfg(feature = "mpi")]
fn shared_output(
    c: &dyn Collective,
    path: Option<&std::path::PathBuf>,
    shape: &[usize],
    creator: u32,
) -> xent::Result<Option<NpyWriter>> {
    let Some(path) = path else { return Ok(None) };
    let created = agree(c, if c.rank() == 0 { NpyWriter::create(path, shape).map(Some) } else { Ok(None) })?;
    let joined = if c.rank() == 0 { Ok(created) } else { NpyWriter::join(path, creator, shape).map(Some) };
    agree(c, joined)
}

#[cfg(feature = "mpi")]
fn run(c: &Metered<'_>, args: &EvalArgs, mut opts: LossOptions, mode: ParallelArg) -> xent::Result<String> {
    if args.out_pred.is_some() || args.plot.is_some() {
        let e = "--out-pred and --plot are not written under --parallel (the JSON has the metrics)";
        return agree(c, Err(Error::InvalidOption(e.into())));
    }
    if args.hidden.is_some() {
        return run_head(c, args, opts, mode);
    }
    let inputs = agree(c, Inputs::open(args, &mut opts))?;
    let backend = agree(c, crate::open_backend(args))?;
    let (rows, v) = (inputs.rows, inputs.classes);
    let none = opts.get_reduction() == Reduction::None;
    let creator = c.all_gather(&[u64::from(std::process::id())])?[0][0] as u32;
    let loss_shape: &[usize] = if none { &[rows] } else { &[] };
    let mut loss_file = shared_output(c, args.out_loss.as_ref(), loss_shape, creator)?;
    let mut grad_file = shared_output(c, args.out_grad.as_ref(), &[rows, v], creator)?;
    stall_if_asked(c);
    let mut start = Instant::now();
    let out = match mode {
        ParallelArg::Rows => {
            let r = xent::parallel::rows(c, rows);
            let block = agree(c, inputs.rows_of(r.clone()))?;
            let gradient = match &mut grad_file {
                Some(w) => Gradient::IntoF32(&mut w.data_mut()[r.start * v..r.end * v]),
                None => Gradient::None,
            };
            let problem =
                Problem::new(block, v, Labels::Classes(inputs.targets().slice(r.clone()))).gradient(gradient);
            let out = xent::parallel::evaluate_rows(c, &*backend, problem, &opts)?;
            if let (Some(w), true) = (&mut loss_file, none) {
                w.data_mut()[r].copy_from_slice(out.row_losses.as_deref().unwrap_or_default());
            }
            out
        }
        ParallelArg::Vocab => {
            let cols = xent::parallel::columns(c, v);
            let shard_logits = agree(c, inputs.columns_of(cols.clone()))?;
            // The clock starts once the shard is in memory, as a tensor-parallel rank
            // would hold it (every rank mapping one file is this command's way in).
            start = Instant::now();
            let shard = xent::vocab::ColumnShard::new(&shard_logits, cols.clone(), v);
            let mut grad = grad_file.as_ref().map(|_| vec![0.0f32; shard_logits.len()]);
            let out = xent::parallel::evaluate_vocab(
                c,
                &*backend,
                shard,
                inputs.targets(),
                &opts,
                grad.as_deref_mut(),
            )?;
            if let (Some(w), Some(g)) = (&mut grad_file, &grad) {
                let width = cols.len().max(1);
                for (row, part) in w.data_mut().chunks_mut(v.max(1)).zip(g.chunks(width)) {
                    row[cols.clone()].copy_from_slice(&part[..cols.len()]);
                }
            }
            if let (Some(w), true, 0) = (&mut loss_file, none, c.rank()) {
                w.data_mut().copy_from_slice(out.row_losses.as_deref().unwrap_or_default());
            }
            out
        }
    };
    let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    let shape = format!("\"rows\": {rows}, \"classes\": {v}");
    let done = Done { out, elapsed_ms, shape, adapter: backend.describe() };
    finish(c, args, mode, done, loss_file, vec![grad_file])
}

/// What a rank's evaluation gave, for [`finish`].
#[cfg(feature = "mpi")]
struct Done {
    out: xent::LossOutput,
    elapsed_ms: f64,
    /// The JSON's shape fields.
    shape: String,
    adapter: String,
}

/// Writes the reduced loss (rank 0), commits every output once every rank has written its
/// part (the others flush, then rank 0 renames), and returns rank 0's JSON.
#[cfg(feature = "mpi")]
fn finish(
    c: &Metered<'_>,
    args: &EvalArgs,
    mode: ParallelArg,
    done: Done,
    mut loss_file: Option<NpyWriter>,
    grads: Vec<Option<NpyWriter>>,
) -> xent::Result<String> {
    let Done { out, elapsed_ms, shape, adapter } = done;
    if let (Some(w), Some(l), 0) = (&mut loss_file, out.loss, c.rank()) {
        w.data_mut()[0] = l;
    }
    // Every part on disk before rank 0 renames the files into place.
    let parts: Vec<NpyWriter> = std::iter::once(loss_file).chain(grads).flatten().collect();
    let (mine, theirs): (Vec<NpyWriter>, Vec<NpyWriter>) = parts.into_iter().partition(|_| c.rank() == 0);
    agree(c, theirs.into_iter().try_for_each(NpyWriter::commit))?;
    agree(c, mine.into_iter().try_for_each(NpyWriter::commit))?;
    let metrics = crate::metrics_outputs(args, &out)?;
    let mode_name = match mode {
        ParallelArg::Rows => "rows",
        ParallelArg::Vocab => "vocab",
    };
    Ok(format!(
        "{{\"loss\": {}, \"z_loss\": {}, {shape}, \"device\": \"{}\", \"adapter\": {}, \
         \"elapsed_ms\": {elapsed_ms:.3}, \"parallel\": \"{mode_name}\", \"ranks\": {}, \"sent_bytes\": {}{metrics}}}",
        out.loss.map_or("null".to_string(), crate::json_number),
        out.z_loss.map_or("null".to_string(), crate::json_number),
        crate::device_name(args.device),
        crate::json_string(&adapter),
        c.size(),
        c.sent_bytes()
    ))
}

/// A test hook: the rank named by `XENT_TEST_STALL_RANK` stalls before its evaluation, as
/// a rank stuck in a driver would, so that the tests see the others end the job after
/// `--rank-timeout` (`tests/mpi.rs`).
#[cfg(feature = "mpi")]
fn stall_if_asked(c: &dyn Collective) {
    if std::env::var("XENT_TEST_STALL_RANK").is_ok_and(|r| r.parse() == Ok(c.rank())) {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Elements `r` of `x`.
#[cfg(feature = "mpi")]
fn part(x: Values<'_>, r: std::ops::Range<usize>) -> Values<'_> {
    match x {
        Values::F32(x) => Values::F32(&x[r]),
        Values::Half(x, f) => Values::Half(&x[r], f),
    }
}

/// `eval --parallel` of the linear head (`--hidden`, `--weight`, `--bias`): by rows, each
/// rank its rows of `h` (`dW` and `db` summed over the ranks, written by rank 0); by
/// vocabulary, each rank its rows of `W` and `b` (the tensor-parallel head: `dh` summed
/// over the ranks, written by rank 0; each rank writes its rows of `dW` and `db`).
#[cfg(feature = "mpi")]
fn run_head(
    c: &Metered<'_>,
    args: &EvalArgs,
    mut opts: LossOptions,
    mode: ParallelArg,
) -> xent::Result<String> {
    use xent::{GradientTo, HeadGradients, LinearHead};
    let files = agree(c, crate::linear::HeadFiles::open(args, &mut opts))?;
    let backend = agree(c, crate::open_backend(args))?;
    let (n, d, v) = (files.rows, files.dim, files.classes);
    let (h, w, b) = files.values();
    let targets = files.targets();
    let none = opts.get_reduction() == Reduction::None;
    let creator = c.all_gather(&[u64::from(std::process::id())])?[0][0] as u32;
    let loss_shape: &[usize] = if none { &[n] } else { &[] };
    let mut loss_file = shared_output(c, args.out_loss.as_ref(), loss_shape, creator)?;
    let mut dh_file = shared_output(c, args.out_grad_hidden.as_ref(), &[n, d], creator)?;
    let mut dw_file = shared_output(c, args.out_grad_weight.as_ref(), &[v, d], creator)?;
    let mut db_file = shared_output(c, args.out_grad_bias.as_ref(), &[v], creator)?;
    stall_if_asked(c);
    let rank0 = c.rank() == 0;
    let start = Instant::now();
    let out = match mode {
        ParallelArg::Rows => {
            let r = xent::parallel::rows(c, n);
            let mut head = LinearHead::new(part(h, r.start * d..r.end * d), w, d);
            if let Some(b) = b {
                head = head.bias(b);
            }
            let owned = |yes: bool| if yes { GradientTo::Owned } else { GradientTo::Skip };
            let grads = HeadGradients {
                hidden: match &mut dh_file {
                    Some(f) => GradientTo::IntoF32(&mut f.data_mut()[r.start * d..r.end * d]),
                    None => GradientTo::Skip,
                },
                weight: owned(dw_file.is_some()),
                bias: owned(db_file.is_some()),
            };
            let mut problem = Problem::linear(head, targets.slice(r.clone()));
            if grads.any() {
                problem = problem.gradient(Gradient::Linear(grads));
            }
            let out = xent::parallel::evaluate_rows(c, &*backend, problem, &opts)?;
            if let (Some(f), true) = (&mut loss_file, none) {
                f.data_mut()[r].copy_from_slice(out.row_losses.as_deref().unwrap_or_default());
            }
            for (f, g) in [(&mut dw_file, &out.grad_weight), (&mut db_file, &out.grad_bias)] {
                if let (Some(f), Some(g), true) = (f, g, rank0) {
                    f.data_mut().copy_from_slice(g);
                }
            }
            out
        }
        ParallelArg::Vocab => {
            let cols = xent::parallel::columns(c, v);
            let shard = xent::vocab::HeadShard {
                hidden: h,
                weight: part(w, cols.start * d..cols.end * d),
                bias: b.map(|b| part(b, cols.clone())),
                dim: d,
                columns: cols.clone(),
                classes: v,
            };
            let grads = dh_file.is_some() || dw_file.is_some() || db_file.is_some();
            let out = xent::parallel::evaluate_vocab_head(c, &*backend, &shard, targets, &opts, grads)?;
            if let (Some(f), Some(g), true) = (&mut dh_file, &out.grad_hidden, rank0) {
                f.data_mut().copy_from_slice(g);
            }
            if let (Some(f), Some(g)) = (&mut dw_file, &out.grad_weight) {
                f.data_mut()[cols.start * d..cols.end * d].copy_from_slice(g);
            }
            if let (Some(f), Some(g)) = (&mut db_file, &out.grad_bias) {
                f.data_mut()[cols.clone()].copy_from_slice(g);
            }
            if let (Some(f), true, true) = (&mut loss_file, none, rank0) {
                f.data_mut().copy_from_slice(out.row_losses.as_deref().unwrap_or_default());
            }
            out
        }
    };
    let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    let shape = format!("\"rows\": {n}, \"classes\": {v}, \"hidden_dim\": {d}");
    let done = Done { out, elapsed_ms, shape, adapter: backend.describe() };
    finish(c, args, mode, done, loss_file, vec![dh_file, dw_file, db_file])
}
