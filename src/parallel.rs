//! Sharded evaluation over the ranks of a [`Collective`] (`shared/docs/semantics.md`,
//! "Sharded (parallel) evaluation"): by rows ([`evaluate_rows`]: each rank holds a block
//! of rows; the `mean` denominators, the loss parts, the metric sums and a head's `dW`/`db`
//! are summed over the ranks in rank order) or by vocabulary ([`evaluate_vocab`]: each
//! rank holds a block of columns of every row; the per-row partials are all-gathered and
//! merged in rank order, the loss and metrics come from them on every rank, and each rank
//! writes its own gradient columns from the merged LSE with no further exchange), also for
//! a linear head whose weight's rows are split over the ranks ([`evaluate_vocab_head`]:
//! the tensor-parallel LM head).
//!
//! Every step ends with [`agree`], so a rank that fails — bad input, a lost device — makes
//! every rank return an error at that step, none left waiting.
//!
//! ```
//! use xent::collective::LocalGroup;
//! use xent::parallel::{columns, evaluate_vocab};
//! use xent::vocab::ColumnShard;
//! use xent::{BackendExt, CpuFast, LossOptions, Targets};
//! let (v, targets) = (5, [4i64, 0, 2]);
//! let logits: Vec<f32> = (0..3 * v).map(|i| (i % 4) as f32 - 1.5).collect();
//! let opts = LossOptions::new().label_smoothing(0.1);
//! let ranks = LocalGroup::new(2);
//! let losses: Vec<f32> = std::thread::scope(|s| {
//!     let running: Vec<_> = ranks.iter().map(|c| {
//!         let (logits, opts) = (&logits, &opts);
//!         s.spawn(move || {
//!             let cols = columns(c, v);
//!             let mine: Vec<f32> = logits.chunks(v).flat_map(|r| r[cols.clone()].to_vec()).collect();
//!             let shard = ColumnShard::new(&mine, cols, v);
//!             evaluate_vocab(c, &CpuFast, shard, Targets::I64(&targets), opts, None).unwrap().loss.unwrap()
//!         })
//!     }).collect();
//!     running.into_iter().map(|h| h.join().unwrap()).collect()
//! });
//! let whole = xent::Reference.cross_entropy(&logits, v, &targets[..], &opts)?.loss.unwrap();
//! assert!(losses.iter().all(|l| (l - whole).abs() < 1e-6));
//! # Ok::<(), xent::Error>(())
//! ```

use std::ops::Range;

use crate::backend::Backend;
use crate::collective::{
    Collective, Wire, agree, all_reduce_partials, combine_metric_sums, sum_f32, sum_f64, sum_u64,
};
use crate::error::{Error, Result};
use crate::head::GradientTo;
use crate::metrics::{MetricSums, Metrics, MetricsSpec};
use crate::options::{Batch, LossOptions, LossOutput, Reduction, Targets, Upstream};
use crate::problem::{Gradient, Labels, Mode, Problem};
use crate::vocab::{
    ColumnShard, HeadShard, finish, head_above, head_gradients, head_partials, metrics, states, target_logits,
};

/// This rank's block of `n` items (rows or columns): even blocks in rank order.
pub fn block(rank: usize, size: usize, n: usize) -> Range<usize> {
    let size = size.max(1);
    n * rank / size..n * (rank + 1) / size
}

/// This rank's rows of an `n`-row batch.
pub fn rows(c: &dyn Collective, n: usize) -> Range<usize> {
    block(c.rank(), c.size(), n)
}

/// This rank's columns of a `classes`-wide vocabulary.
pub fn columns(c: &dyn Collective, classes: usize) -> Range<usize> {
    block(c.rank(), c.size(), classes)
}

/// The counts a block of rows adds to the `mean` denominators (cross-entropy part, z-loss
/// part): Σ w_y and the counted rows for class indices, the rows for probabilities, the
/// elements for binary targets.
fn block_counts(problem: &Problem<'_>, opts: &LossOptions) -> Result<(f64, f64)> {
    let (v, rows) = (problem.classes, problem.rows());
    Ok(match problem.labels {
        Labels::Classes(t) => {
            let b = Batch::new(rows * v, v, t, opts)?;
            (b.weighted_count, b.counted_rows as f64)
        }
        Labels::Probabilities(_) => (rows as f64, rows as f64),
        Labels::Binary(_) => ((rows * v) as f64, (rows * v) as f64),
    })
}

/// Rows mode: this rank's `block` of rows (any problem the path evaluates) with the whole
/// batch's `mean` denominators. Returns the whole batch's loss, z-loss part and metric
/// figures (the same on every rank) beside this block's row losses, LSE, gradient and
/// per-row metrics; a linear head's `dW` and `db` come back owned, summed over the
/// ranks (ask for them with [`GradientTo::Owned`]).
pub fn evaluate_rows(
    c: &dyn Collective,
    path: &dyn Backend,
    block: Problem<'_>,
    opts: &LossOptions,
) -> Result<LossOutput> {
    let checked = block_counts(&block, opts).and_then(|counts| {
        if let Gradient::Linear(g) = &block.gradient
            && [&g.weight, &g.bias]
                .iter()
                .any(|to| matches!(to, GradientTo::IntoF32(_) | GradientTo::IntoHalf(_)))
        {
            return Err(Error::Unsupported {
                path: "rows over ranks".into(),
                cell: "a linear head's dW or db into a slice".into(),
                why: "each rank holds a part of the sum: ask for them owned (GradientTo::Owned)".into(),
            });
        }
        Ok(counts)
    });
    // Errors name rows of the whole batch: this block starts after the lower ranks' rows.
    let counts = c.all_gather(&[block.rows() as u64])?;
    let first: usize = counts[..c.rank()].iter().map(|w| w.first().copied().unwrap_or(0) as usize).sum();
    let (d, dz) = agree(c, checked.map_err(|e| in_batch(e, first)))?;
    let sums = sum_f64(c, &[d, dz])?;
    let mut block_opts = opts.clone();
    let n_items = opts.get_n_items();
    block_opts.denominators = Some((n_items.unwrap_or(sums[0]), n_items.unwrap_or(sums[1])));
    let reduced = matches!(block.mode, Mode::Fused) && opts.get_reduction() != Reduction::None;
    let mut out = agree(c, path.evaluate(block, &block_opts).map_err(|e| in_batch(e, first)))?;
    let head_sums = out.grad_weight.is_some() || out.grad_bias.is_some();
    let parts = sum_f64(
        c,
        &[out.loss.map_or(0.0, f64::from), out.z_loss.map_or(0.0, f64::from), f64::from(u8::from(head_sums))],
    )?;
    if reduced {
        out.loss = out.loss.map(|_| parts[0] as f32);
        out.z_loss = out.z_loss.map(|_| parts[1] as f32);
    }
    // A head's dW and db: every rank holds its rows' part; summed in rank order.
    if parts[2] > 0.0 {
        if parts[2] != c.size() as f64 {
            return Err(Error::Collective("some ranks formed dW or db and others did not".into()));
        }
        for g in [&mut out.grad_weight, &mut out.grad_bias] {
            let total = sum_f32(c, g.as_deref().unwrap_or_default())?;
            if g.is_some() {
                *g = Some(total);
            }
        }
    }
    if let Some(spec) = opts.get_metrics() {
        let mine = out.metrics.as_ref().map_or_else(|| MetricSums::new(spec), |m| m.sums.clone());
        let total = combine_metric_sums(c, &mine)?;
        let mut m = Metrics::from_sums(&total, None);
        if let Some(local) = out.metrics.take() {
            (m.predictions, m.confidences) = (local.predictions, local.confidences);
        }
        out.metrics = Some(m);
    }
    Ok(out)
}

/// A block's error with its row moved to the whole batch's numbering.
fn in_batch(e: Error, first: usize) -> Error {
    match e {
        Error::TargetOutOfRange { row, value, classes, ignore_index } => {
            Error::TargetOutOfRange { row: row + first, value, classes, ignore_index }
        }
        e => e,
    }
}

/// Vocabulary mode: this rank's `shard` of columns of every row (the ranks' shards tile
/// the vocabulary in rank order), the whole problem's class-index targets and options.
/// Returns, on every rank, the whole problem's loss, z-loss part, row losses, LSE and
/// (with [`LossOptions::metrics`]) metrics; `gradient`, when given, receives this shard's
/// columns of d(loss)/d(logits) [rows, shard width], from the merged LSE.
pub fn evaluate_vocab(
    c: &dyn Collective,
    path: &dyn Backend,
    shard: ColumnShard<'_>,
    targets: Targets<'_>,
    opts: &LossOptions,
    gradient: Option<&mut [f32]>,
) -> Result<LossOutput> {
    check_tiling(c, &shard.columns, shard.classes)?;
    let wire = Wire::of(opts);
    let mine = agree(c, path.vocab_partials(shard.clone(), targets, opts))?;
    let merged = all_reduce_partials(c, &mine, wire)?;
    let mut out = agree(c, finish(&merged, targets, shard.classes, opts))?;
    if opts.get_metrics().is_some() {
        let wants_top_k = opts.get_metrics().is_some_and(|m: &MetricsSpec| !m.get_top_k().is_empty());
        let above = if wants_top_k {
            let mine = agree(c, path.vocab_above(shard.clone(), targets, &target_logits(&merged), opts))?;
            sum_u64(c, &mine)?
        } else {
            vec![0; merged.len()]
        };
        out.metrics = Some(agree(c, metrics(&merged, &above, targets, opts))?);
    }
    if let Some(g) = gradient {
        let st = states(&merged);
        agree(c, path.vocab_gradient(shard, targets, &st, Upstream::Scalar(1.0), opts, g))?;
    }
    Ok(out)
}

/// Step 0 of a vocabulary-parallel call: the ranks' column ranges tile [0, V) in rank
/// order, on every rank.
fn check_tiling(c: &dyn Collective, columns: &Range<usize>, classes: usize) -> Result<()> {
    let ranges = c.all_gather(&[columns.start as u64, columns.end as u64, classes as u64])?;
    let mut next = 0u64;
    for (rank, r) in ranges.iter().enumerate() {
        if r.len() != 3 || r[0] != next || r[2] != classes as u64 {
            return Err(Error::InvalidOption(format!(
                "rank {rank}'s columns {:?} of {} classes do not follow column {next} of {classes} classes: the \
                 shards must tile the vocabulary in rank order",
                r.first().zip(r.get(1)).map(|(a, b)| *a..*b),
                r.get(2).copied().unwrap_or(0),
            )));
        }
        next = r[1];
    }
    if next != classes as u64 {
        return Err(Error::InvalidOption(format!(
            "the shards end at column {next}, short of the vocabulary's {classes}"
        )));
    }
    Ok(())
}

/// Vocabulary mode of a linear head (the tensor-parallel LM head): this rank's `shard`
/// (every row's `h`, its rows of `W` and `b`), the whole problem's targets and options.
/// Returns, on every rank, the loss, z-loss part, row losses, LSE and (with
/// [`LossOptions::metrics`]) metrics; with `gradients`, also `dh` summed over the ranks
/// (in rank order: an all-gather of rows × D values a rank, what a row-parallel layer's
/// all-reduce moves), and this shard's rows of `dW` and part of `db` in
/// [`LossOutput::grad_weight`] and [`LossOutput::grad_bias`].
pub fn evaluate_vocab_head(
    c: &dyn Collective,
    path: &dyn Backend,
    shard: &HeadShard<'_>,
    targets: Targets<'_>,
    opts: &LossOptions,
    gradients: bool,
) -> Result<LossOutput> {
    check_tiling(c, &shard.columns, shard.classes)?;
    let wire = Wire::of(opts);
    let mine = agree(c, head_partials(path, shard, targets, opts))?;
    let merged = all_reduce_partials(c, &mine, wire)?;
    let mut out = agree(c, finish(&merged, targets, shard.classes, opts))?;
    if let Some(spec) = opts.get_metrics() {
        let above = if spec.get_top_k().is_empty() {
            vec![0; merged.len()]
        } else {
            let mine = agree(c, head_above(path, shard, targets, &target_logits(&merged), opts))?;
            sum_u64(c, &mine)?
        };
        out.metrics = Some(agree(c, metrics(&merged, &above, targets, opts))?);
    }
    if gradients {
        let g = agree(c, head_gradients(path, shard, targets, &states(&merged), opts))?;
        out.grad_hidden = Some(sum_f32(c, &g.hidden)?);
        out.grad_weight = Some(g.weight);
        out.grad_bias = g.bias;
    }
    Ok(out)
}
