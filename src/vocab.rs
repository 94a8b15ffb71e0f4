//! Vocabulary-parallel evaluation: shard k holds the columns `[c_k, c_{k+1})` of every row
//! and computes one [`VocabPartial`] per row; partials merge by one rule,
//! [`VocabPartial::combine`], in any grouping (threads, devices, ranks); the loss comes
//! from the merged partials ([`finish`]), and each shard writes its own gradient columns
//! from the merged LSE with no further exchange (`shared/docs/semantics.md`, "Sharded
//! (parallel) evaluation").
//!
//! Every path that implements the three steps of [`Backend`](crate::Backend) — [`vocab_partials`](crate::Backend::vocab_partials),
//! [`vocab_above`](crate::Backend::vocab_above) (the top-k counts, a second step once the target's logit is
//! known) and [`vocab_gradient`](crate::Backend::vocab_gradient) — serves as a shard: the f64 reference
//! ([`reference_partials`], [`reference_above`], [`reference_gradient`]), the fast CPU
//! path and the GPU's host path; device-resident shards go through
//! [`GpuContext::record_vocab_partials`](crate::GpuContext::record_vocab_partials) and
//! [`record_vocab_gradient`](crate::GpuContext::record_vocab_gradient). The metrics come from merged partials and the summed counts ([`metrics`]).
//!
//! ```
//! use xent::vocab::{ColumnShard, VocabPartial, finish, reference_partials};
//! use xent::{BackendExt, LossOptions, Targets};
//! let logits = [2.0f32, 0.5, -1.0, 0.0, /* row 2 */ 1.0, 1.0, 3.0, 0.0];
//! let (targets, opts) = ([0i64, 2], LossOptions::new());
//! // Two shards of a 4-class vocabulary: columns 0..1 and 1..4 of each row.
//! let left: Vec<f32> = logits.chunks(4).map(|r| r[0]).collect();
//! let right: Vec<f32> = logits.chunks(4).flat_map(|r| r[1..].to_vec()).collect();
//! let a = reference_partials(ColumnShard::new(&left, 0..1, 4), Targets::I64(&targets), &opts)?;
//! let b = reference_partials(ColumnShard::new(&right, 1..4, 4), Targets::I64(&targets), &opts)?;
//! let merged: Vec<VocabPartial> = a.iter().zip(&b).map(|(a, b)| a.combine(*b)).collect();
//! let out = finish(&merged, Targets::I64(&targets), 4, &opts)?;
//! let whole = xent::Reference.cross_entropy(&logits, 4, &targets[..], &opts)?;
//! assert!((out.loss.unwrap() - whole.loss.unwrap()).abs() < 1e-6);
//! # Ok::<(), xent::Error>(())
//! ```

use std::ops::Range;

use crate::cpu::reference::{ClassGrad, ClassWeights};
use crate::error::{Error, Result};
use crate::head::Values;
use crate::metrics::{Metrics, MetricsSpec, RowMetrics};
use crate::options::{Batch, LossOptions, LossOutput, Targets, Upstream};
use crate::row_state::RowState;

/// One row's partial over a range of columns: what the shards of a vocabulary-parallel
/// evaluation exchange.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct VocabPartial {
    /// (max, Σ exp(z − max)) of the range's transformed logits (scale, softcap).
    pub state: RowState,
    /// The target's transformed logit, from the shard whose range holds the target's
    /// column; `None` elsewhere and for ignored rows.
    pub target: Option<f32>,
    /// Σ_c w_c z_c over the range (w_c = 1 without class weights): label smoothing's sum
    /// (0 on the fast CPU path without label smoothing).
    pub smooth: f64,
    /// Σ_c exp(z_c − max) (z_c − max) about `state.max`: the entropy's sum (0 on the fast
    /// CPU path without [`LossOptions::metrics`]).
    pub spread: f64,
    /// Whether the range holds a NaN logit (the metrics then predict nothing; false on the
    /// fast CPU path without [`LossOptions::metrics`]).
    pub nan: bool,
    /// The range's largest transformed logit and its column in the whole vocabulary
    /// (the lowest on ties; NaN logits are passed over); `None` for an empty range (and
    /// on the fast CPU path without [`LossOptions::metrics`]).
    pub argmax: Option<(usize, f32)>,
}

impl Default for VocabPartial {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl VocabPartial {
    /// The identity of [`VocabPartial::combine`].
    pub const EMPTY: VocabPartial = VocabPartial {
        state: RowState::EMPTY,
        target: None,
        smooth: 0.0,
        spread: 0.0,
        nan: false,
        argmax: None,
    };

    /// The partial of the union of two disjoint column ranges: the states by the
    /// (max, sum) rule, the target logit from its owner, the sums added (the spread moved
    /// to the common max), the argmax by the larger value (the lower column on ties).
    pub fn combine(self, other: Self) -> Self {
        let state = self.state.combine(other.state);
        // Σ e^{z − M}(z − M) = e^{m − M} (spread + (m − M) sum) for each side; an empty
        // side (sum 0) adds nothing.
        let moved = |p: &Self| {
            if p.state.sum == 0.0 {
                return 0.0;
            }
            let d = f64::from(p.state.max) - f64::from(state.max);
            d.exp() * (p.spread + d * f64::from(p.state.sum))
        };
        let argmax = match (self.argmax, other.argmax) {
            (Some(a), Some(b)) => Some(if b.1 > a.1 || (b.1 == a.1 && b.0 < a.0) { b } else { a }),
            (a, b) => a.or(b),
        };
        VocabPartial {
            state,
            target: self.target.or(other.target),
            smooth: self.smooth + other.smooth,
            spread: moved(&self) + moved(&other),
            nan: self.nan || other.nan,
            argmax,
        }
    }
}

/// A shard's logits: the columns `columns` of every row of a `classes`-wide vocabulary,
/// row major [rows, columns.len()].
#[derive(Clone, Debug)]
pub struct ColumnShard<'a> {
    /// The shard's logits.
    pub logits: &'a [f32],
    /// Its columns in the whole vocabulary.
    pub columns: Range<usize>,
    /// The whole vocabulary's size V.
    pub classes: usize,
}

impl<'a> ColumnShard<'a> {
    /// Columns `columns` of a `classes`-wide vocabulary.
    pub fn new(logits: &'a [f32], columns: Range<usize>, classes: usize) -> Self {
        Self { logits, columns, classes }
    }

    /// Checks the shard against the targets and options of the whole problem; returns the
    /// whole batch (its checked targets and `mean` denominators).
    fn check(&self, targets: Targets<'_>, opts: &LossOptions) -> Result<Batch> {
        let (v, width) = (self.classes, self.columns.len());
        if self.columns.end > v || self.columns.start > self.columns.end {
            return Err(Error::InvalidOption(format!(
                "columns {:?} of a vocabulary of {v} classes",
                self.columns
            )));
        }
        let rows = targets.len();
        if self.logits.len() != rows * width {
            return Err(Error::Shape {
                what: format!("a shard's logits (rows {rows} × its {width} columns)"),
                got: self.logits.len(),
                expected: rows * width,
            });
        }
        Batch::new(rows * v, v, targets, opts)
    }
}

/// The f64 reference's partials of one shard, one per row.
pub fn reference_partials(
    shard: ColumnShard<'_>,
    targets: Targets<'_>,
    opts: &LossOptions,
) -> Result<Vec<VocabPartial>> {
    let batch = shard.check(targets, opts)?;
    let width = shard.columns.len();
    let weights = ClassWeights::new(opts, shard.classes);
    let mut out = Vec::with_capacity(batch.rows);
    for (r, &t) in batch.targets.iter().enumerate() {
        let row = &shard.logits[r * width..(r + 1) * width];
        let z: Vec<f64> =
            row.iter().map(|&x| crate::cpu::reference::transform(f64::from(x), opts).0).collect();
        let mut p = VocabPartial { state: reference_state(&z), ..VocabPartial::EMPTY };
        p.nan = z.iter().any(|x| x.is_nan());
        if p.state.sum > 0.0 {
            let m = f64::from(p.state.max);
            p.spread = z
                .iter()
                .map(|&x| (x - m).exp())
                .zip(&z)
                .filter(|(e, _)| *e != 0.0)
                .map(|(e, &x)| e * (x - m))
                .sum();
        }
        for (j, &zj) in z.iter().enumerate() {
            let c = shard.columns.start + j;
            p.smooth += weights.of(c) * zj;
            if !zj.is_nan() && p.argmax.is_none_or(|(_, m)| zj as f32 > m) {
                p.argmax = Some((c, zj as f32));
            }
        }
        if t != Batch::IGNORED && shard.columns.contains(&(t as usize)) {
            p.target = Some(z[t as usize - shard.columns.start] as f32);
        }
        out.push(p);
    }
    Ok(out)
}

/// The (max, sum) state of transformed logits computed in f64: the max rounded to f32
/// (exact for unscaled logits), the sum of `exp(z − max)` about it rounded once. A NaN or
/// +inf logit makes the sum NaN; a range of −inf (or no columns) is the empty state.
fn reference_state(z: &[f64]) -> RowState {
    if z.iter().any(|x| x.is_nan() || *x == f64::INFINITY) {
        return RowState { max: crate::row_state::EMPTY_MAX, sum: f32::NAN };
    }
    let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return RowState::EMPTY;
    }
    let m = max as f32;
    RowState { max: m, sum: z.iter().map(|&x| (x - f64::from(m)).exp()).sum::<f64>() as f32 }
}

/// A merged state's LSE in f64 (`max + ln sum`, not rounded to f32 between: at logits
/// near 1e4 that rounding alone would cost 5e-4).
fn lse_of(state: RowState) -> f64 {
    f64::from(state.max) + f64::from(state.sum).ln()
}

/// The loss of the whole problem from each row's merged partial: the reduced loss (and
/// its z-loss part), the row losses (always for `none`) and the LSE. `targets` and
/// `opts` are the whole problem's; `classes` the whole vocabulary's size.
pub fn finish(
    partials: &[VocabPartial],
    targets: Targets<'_>,
    classes: usize,
    opts: &LossOptions,
) -> Result<LossOutput> {
    let v = classes;
    let batch = Batch::new(targets.len() * v, v, targets, opts)?;
    if partials.len() != batch.rows {
        return Err(Error::Shape {
            what: "merged partials (one per row)".into(),
            got: partials.len(),
            expected: batch.rows,
        });
    }
    let eps = opts.get_label_smoothing();
    let s = opts.get_z_loss();
    let weights = ClassWeights::new(opts, v);
    let (mut losses, mut lses) = (Vec::with_capacity(batch.rows), Vec::with_capacity(batch.rows));
    let (mut sum, mut z_sum) = (0.0f64, 0.0f64);
    for (r, (p, &t)) in partials.iter().zip(&batch.targets).enumerate() {
        let l = lse_of(p.state);
        lses.push(l as f32);
        if t == Batch::IGNORED {
            losses.push(0.0);
            continue;
        }
        let y = t as usize;
        let z_t = p.target.ok_or_else(|| {
            Error::InvalidOption(format!("row {r}: no shard's partial holds its target {y}'s logit"))
        })?;
        let mut loss = (1.0 - eps) * weights.of(y) * (l - f64::from(z_t));
        if eps > 0.0 {
            loss += eps / v as f64 * (weights.total * l - p.smooth);
        }
        if s > 0.0 {
            loss += s * l * l;
            z_sum += s * l * l;
        }
        sum += loss;
        losses.push(loss as f32);
    }
    let reduction = opts.get_reduction();
    let (loss, z_loss) = batch.reduce_with_z(sum, z_sum, reduction);
    Ok(LossOutput {
        loss,
        row_losses: Some(losses),
        lse: Some(lses),
        z_loss: z_loss.filter(|_| s > 0.0),
        ..Default::default()
    })
}

/// The f64 reference's gradient of one shard's columns, from the whole rows' merged
/// states (their LSE in f64), times `upstream` (as a separate backward's), into `out`
/// [rows, columns.len()].
pub fn reference_gradient(
    shard: ColumnShard<'_>,
    targets: Targets<'_>,
    states: &[RowState],
    upstream: Upstream<'_>,
    opts: &LossOptions,
    out: &mut [f32],
) -> Result<()> {
    let batch = checked_gradient(&shard, targets, states, upstream, opts, out)?;
    let (v, width) = (shard.classes, shard.columns.len());
    let reduction = opts.get_reduction();
    let weights = ClassWeights::new(opts, v);
    let d = batch.divisor(reduction);
    let ce_scale = if d != 0.0 { 1.0 / d } else { 0.0 };
    let z_scale = 1.0 / batch.z_divisor(reduction);
    for (r, &t) in batch.targets.iter().enumerate() {
        let g = &mut out[r * width..(r + 1) * width];
        if t == Batch::IGNORED {
            g.fill(0.0);
            continue;
        }
        let (l, up) = (lse_of(states[r]), f64::from(upstream.of_row(r)));
        let grad = ClassGrad::new(t as usize, l, &weights, v, opts, (ce_scale, z_scale));
        for (j, (o, &x)) in g.iter_mut().zip(&shard.logits[r * width..(r + 1) * width]).enumerate() {
            let (z, dz) = crate::cpu::reference::transform(f64::from(x), opts);
            *o = (grad.at(shard.columns.start + j, z, dz, &weights) * up) as f32;
        }
    }
    Ok(())
}

/// The top-k step on the f64 reference: for each counted row, the shard's columns whose
/// transformed logit (rounded to f32) exceeds the target's, `target_logits` taken from
/// the merged partials (0 for an ignored row).
pub fn reference_above(
    shard: ColumnShard<'_>,
    targets: Targets<'_>,
    target_logits: &[Option<f32>],
    opts: &LossOptions,
) -> Result<Vec<u64>> {
    let batch = shard.check(targets, opts)?;
    check_rows("target logits", target_logits.len(), batch.rows)?;
    let width = shard.columns.len();
    Ok((0..batch.rows)
        .map(|r| match (batch.targets[r] != Batch::IGNORED, target_logits[r]) {
            (true, Some(zt)) => shard.logits[r * width..(r + 1) * width]
                .iter()
                .filter(|&&x| crate::cpu::reference::transform(f64::from(x), opts).0 as f32 > zt)
                .count() as u64,
            _ => 0,
        })
        .collect())
}

pub(crate) fn check_rows(what: &str, got: usize, rows: usize) -> Result<()> {
    if got != rows {
        return Err(Error::Shape { what: format!("{what} (one per row)"), got, expected: rows });
    }
    Ok(())
}

/// The metrics of the whole problem from each row's merged partial and its count of
/// logits above the target summed over the shards (`above`; needed for the top-k
/// figures, zeros otherwise): the same figures as an unsharded evaluation's.
pub fn metrics(
    partials: &[VocabPartial],
    above: &[u64],
    targets: Targets<'_>,
    opts: &LossOptions,
) -> Result<Metrics> {
    let spec = opts.get_metrics().cloned().unwrap_or_else(MetricsSpec::new);
    spec.validate()?;
    let rows = targets.len();
    check_rows("merged partials", partials.len(), rows)?;
    check_rows("counts above the target", above.len(), rows)?;
    let ignore = opts.get_ignore_index();
    let per_row: Vec<RowMetrics> = partials
        .iter()
        .zip(above)
        .enumerate()
        .map(|(r, (p, &n))| {
            let t = targets.get(r);
            let target = if t == ignore { -1 } else { t };
            let argmax = if p.nan { None } else { p.argmax.map(|a| a.0) };
            let z_t = if target >= 0 { p.target.unwrap_or(f32::NAN) } else { 0.0 };
            RowMetrics::from_stats(target, argmax, n, p.state.max, p.state.sum, p.spread as f32, z_t)
        })
        .collect();
    Ok(Metrics::from_rows(&spec, &per_row))
}

/// Each row's merged (max, sum) state, from merged partials (the input of the gradient
/// step).
pub fn states(partials: &[VocabPartial]) -> Vec<RowState> {
    partials.iter().map(|p| p.state).collect()
}

/// The target's logit of each row, from merged partials (the input of the top-k step).
pub fn target_logits(partials: &[VocabPartial]) -> Vec<Option<f32>> {
    partials.iter().map(|p| p.target).collect()
}

/// Checks a shard for a path's `vocab_partials` and friends: the whole batch.
pub(crate) fn checked(shard: &ColumnShard<'_>, targets: Targets<'_>, opts: &LossOptions) -> Result<Batch> {
    shard.check(targets, opts)
}

/// What a path that is not a vocabulary shard returns.
pub(crate) fn unsupported(path: String, step: &str) -> Error {
    Error::Unsupported {
        path,
        cell: format!("vocabulary-parallel {step}"),
        why: "this path computes whole rows only: shard the vocabulary on the fast CPU path or the reference"
            .into(),
    }
}

/// Checks a shard's gradient step: the shard, one state and upstream value per row, `out`
/// the shard's size.
pub(crate) fn checked_gradient(
    shard: &ColumnShard<'_>,
    targets: Targets<'_>,
    states: &[RowState],
    upstream: Upstream<'_>,
    opts: &LossOptions,
    out: &[f32],
) -> Result<Batch> {
    let batch = shard.check(targets, opts)?;
    check_rows("merged states", states.len(), batch.rows)?;
    upstream.check(batch.rows)?;
    if out.len() != shard.logits.len() {
        return Err(Error::Shape {
            what: "a shard's gradient".into(),
            got: out.len(),
            expected: shard.logits.len(),
        });
    }
    Ok(batch)
}

/// A shard of a linear head's vocabulary — the tensor-parallel LM head: every row's hidden
/// state `h` [rows, dim] and this shard's rows of the weight, `W[columns]` [width, dim]
/// (`nn.Linear`'s layout), and of the bias. Its logits `h W[columns]ᵀ + b[columns]` exist
/// only as tiles of rows (as in the whole head: at most
/// 2²³ logits a tile), each tile's partials and gradient from a path's vocabulary steps,
/// its products on the CPU (`gemm`, f32, inputs widened from half precision).
#[derive(Clone, Debug)]
pub struct HeadShard<'a> {
    /// `h` [rows, dim].
    pub hidden: Values<'a>,
    /// `W[columns]` [width, dim].
    pub weight: Values<'a>,
    /// `b[columns]` \[width\], if the head has a bias.
    pub bias: Option<Values<'a>>,
    /// The hidden dimension D.
    pub dim: usize,
    /// The shard's columns of the whole vocabulary.
    pub columns: Range<usize>,
    /// The whole vocabulary's size V.
    pub classes: usize,
}

/// What a head shard's backward gives (upstream gradient 1, or 1 a row for `none`).
#[derive(Clone, Debug, PartialEq)]
pub struct HeadShardGradients {
    /// This shard's part of `dh` [rows, dim]: `dh` is the sum of every shard's.
    pub hidden: Vec<f32>,
    /// `dW[columns]` [width, dim]: this shard's rows of `dW`, whole.
    pub weight: Vec<f32>,
    /// `db[columns]` \[width\], with a bias.
    pub bias: Option<Vec<f32>>,
}

impl HeadShard<'_> {
    /// Checks the shard's sizes against the whole problem's targets and options.
    fn check(&self, targets: Targets<'_>, opts: &LossOptions) -> Result<Batch> {
        let (rows, d, width) = (targets.len(), self.dim, self.columns.len());
        if d == 0 {
            return Err(Error::InvalidOption("a head shard's hidden dimension must be at least 1".into()));
        }
        if self.columns.end > self.classes || self.columns.start > self.columns.end {
            return Err(Error::InvalidOption(format!(
                "columns {:?} of a vocabulary of {} classes",
                self.columns, self.classes
            )));
        }
        let sizes = [
            ("a head shard's hidden states (rows × D)", self.hidden.len(), rows * d),
            ("a head shard's weight rows (its width × D)", self.weight.len(), width * d),
        ];
        for (what, got, expected) in sizes {
            if got != expected {
                return Err(Error::Shape { what: what.into(), got, expected });
            }
        }
        if let Some(b) = &self.bias
            && b.len() != width
        {
            return Err(Error::Shape {
                what: "a head shard's bias (its width)".into(),
                got: b.len(),
                expected: width,
            });
        }
        Batch::new(rows * self.classes, self.classes, targets, opts)
    }

    /// Rows `r` of the hidden states as f32.
    fn hidden_rows(&self, r: Range<usize>) -> std::borrow::Cow<'_, [f32]> {
        let e = r.start * self.dim..r.end * self.dim;
        crate::cpu::fast_linear::widen(match self.hidden {
            Values::F32(x) => Values::F32(&x[e]),
            Values::Half(x, f) => Values::Half(&x[e], f),
        })
    }

    /// Walks the shard's logits in tiles of rows: `each(rows, h rows, W, tile)`.
    fn tiles(
        &self,
        rows: usize,
        mut each: impl FnMut(Range<usize>, &[f32], &[f32], &[f32]) -> Result<()>,
    ) -> Result<()> {
        use crate::cpu::fast_linear::{Mat, block_rows, matmul, widen};
        let (d, width) = (self.dim, self.columns.len());
        let w = widen(self.weight);
        let b = self.bias.map(widen);
        let step = block_rows(rows, width);
        let mut tile = vec![0.0f32; step * width];
        for r0 in (0..rows).step_by(step) {
            let r = r0..(r0 + step).min(rows);
            let h = self.hidden_rows(r.clone());
            let t = &mut tile[..r.len() * width];
            matmul(t, Mat::rows(&h, d), Mat::transposed(&w, d), (r.len(), width, d), false);
            if let Some(b) = &b {
                t.chunks_mut(width.max(1))
                    .for_each(|row| row.iter_mut().zip(b.iter()).for_each(|(x, &b)| *x += b));
            }
            each(r, &h, &w, t)?;
        }
        Ok(())
    }
}

/// A head shard's partials on `path` (its vocabulary steps on each tile of logits).
pub fn head_partials(
    path: &dyn crate::Backend,
    shard: &HeadShard<'_>,
    targets: Targets<'_>,
    opts: &LossOptions,
) -> Result<Vec<VocabPartial>> {
    let batch = shard.check(targets, opts)?;
    let mut out = Vec::with_capacity(batch.rows);
    shard.tiles(batch.rows, |r, _, _, tile| {
        let tile_shard = ColumnShard::new(tile, shard.columns.clone(), shard.classes);
        out.extend(path.vocab_partials(tile_shard, targets.slice(r), opts)?);
        Ok(())
    })?;
    Ok(out)
}

/// A head shard's top-k counts on `path`, against the merged partials' target logits.
pub fn head_above(
    path: &dyn crate::Backend,
    shard: &HeadShard<'_>,
    targets: Targets<'_>,
    target_logits: &[Option<f32>],
    opts: &LossOptions,
) -> Result<Vec<u64>> {
    let batch = shard.check(targets, opts)?;
    check_rows("target logits", target_logits.len(), batch.rows)?;
    let mut out = Vec::with_capacity(batch.rows);
    shard.tiles(batch.rows, |r, _, _, tile| {
        let tile_shard = ColumnShard::new(tile, shard.columns.clone(), shard.classes);
        out.extend(path.vocab_above(tile_shard, targets.slice(r.clone()), &target_logits[r], opts)?);
        Ok(())
    })?;
    Ok(out)
}

/// A head shard's gradients on `path` from the whole rows' merged states: for each tile, `G`
/// (the path's gradient of the tile's logits, divided by the whole batch's `mean`
/// denominators), `dh (part) = G · W[columns]`, `dW[columns] += Gᵀ · h` (tiles in row
/// order), `db[columns] += Σ_rows G` (f64, rounded once).
pub fn head_gradients(
    path: &dyn crate::Backend,
    shard: &HeadShard<'_>,
    targets: Targets<'_>,
    states: &[RowState],
    opts: &LossOptions,
) -> Result<HeadShardGradients> {
    use crate::cpu::fast_linear::{Mat, add_column_sums, matmul};
    let batch = shard.check(targets, opts)?;
    check_rows("merged states", states.len(), batch.rows)?;
    let (d, width) = (shard.dim, shard.columns.len());
    let mut tile_opts = opts.clone();
    tile_opts.denominators = Some((batch.mean_denominator, batch.z_denominator));
    let mut dh = vec![0.0f32; batch.rows * d];
    let mut dw = vec![0.0f32; width * d];
    let mut db = vec![0.0f64; width];
    let mut g = Vec::new();
    let mut first = true;
    shard.tiles(batch.rows, |r, h, w, tile| {
        g.resize(tile.len(), 0.0);
        let tile_shard = ColumnShard::new(tile, shard.columns.clone(), shard.classes);
        let up = Upstream::Scalar(1.0);
        path.vocab_gradient(
            tile_shard,
            targets.slice(r.clone()),
            &states[r.clone()],
            up,
            &tile_opts,
            &mut g,
        )?;
        let m = r.len();
        matmul(&mut dh[r.start * d..r.end * d], Mat::rows(&g, width), Mat::rows(w, d), (m, d, width), false);
        matmul(&mut dw, Mat::transposed(&g, width), Mat::rows(h, d), (width, d, m), !first);
        first = false;
        add_column_sums(&mut db, &g, width.max(1));
        Ok(())
    })?;
    Ok(HeadShardGradients {
        hidden: dh,
        weight: dw,
        bias: shard.bias.as_ref().map(|_| db.iter().map(|&x| x as f32).collect()),
    })
}
