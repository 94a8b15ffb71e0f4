//! The fast CPU path's half of [`crate::vocab`]: a shard's per-row partials, the top-k
//! counts of its second step, and its gradient columns from the merged LSE, in f32 lanes
//! (the fast path's `exp`, its blocked online softmax) over rayon's threads, a block of
//! rows a task. Each row is computed alone, so the result does not depend on the threads.

use rayon::prelude::*;

use super::fast::{BLOCK, exp_f32, multiversion, online_metrics, row_stats};
use crate::options::{Batch, LossOptions, Upstream};
use crate::vocab::{ColumnShard, VocabPartial};

/// Rows of a task: enough work per task for rayon, few enough to spread.
fn rows_per_task(width: usize) -> usize {
    (1usize << 16).div_ceil(width.max(1)).clamp(1, 256)
}

/// The logit transform in f32: none, a scale, or scale then softcap.
#[derive(Clone, Copy)]
enum Transform {
    Plain,
    Scale(f32),
    Cap { alpha: f32, cap: f32 },
}

impl Transform {
    fn of(opts: &LossOptions) -> Self {
        let alpha = opts.get_logit_scale() as f32;
        match opts.get_softcap() {
            Some(c) => Transform::Cap { alpha, cap: c as f32 },
            None if alpha == 1.0 => Transform::Plain,
            None => Transform::Scale(alpha),
        }
    }

    /// Whether the logits change (else they are read in place).
    fn transforms(self) -> bool {
        !matches!(self, Transform::Plain)
    }

    /// The transformed row (the row itself when plain, else written into `z`), with the
    /// slope dz/dx into `dz` when given.
    #[inline(always)]
    fn apply<'a>(self, row: &'a [f32], z: &'a mut [f32], mut dz: Option<&mut [f32]>) -> &'a [f32] {
        match self {
            Transform::Plain => {
                if let Some(dz) = dz {
                    dz.fill(1.0);
                }
                row
            }
            Transform::Scale(a) => {
                z.iter_mut().zip(row).for_each(|(z, &x)| *z = a * x);
                if let Some(dz) = dz {
                    dz.fill(a);
                }
                z
            }
            Transform::Cap { alpha, cap } => {
                for (j, (z, &x)) in z.iter_mut().zip(row).enumerate() {
                    let t = (alpha * x / cap).tanh();
                    *z = cap * t;
                    if let Some(dz) = dz.as_deref_mut() {
                        dz[j] = alpha * (1.0 - t * t);
                    }
                }
                z
            }
        }
    }
}

thread_local! {
    /// A thread's scratch rows (the transformed logits and their slopes), reused by every
    /// task the thread runs.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's two scratch rows of `width` values (empty when not
/// `needed`: a plain transform reads the logits in place).
fn with_scratch<R>(width: usize, needed: bool, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let n = if needed { width } else { 0 };
        let (z, dz) = &mut *s;
        if z.len() < n {
            z.resize(n, 0.0);
            dz.resize(n, 0.0);
        }
        f(&mut z[..n], &mut dz[..n])
    })
}

/// One row's partial over the shard's columns (transformed logits `z`).
#[inline(always)]
fn partial_of(
    z: &[f32],
    base: usize,
    local_target: Option<usize>,
    weights: Option<&[f32]>,
    o: Want,
) -> VocabPartial {
    let mut p = VocabPartial::EMPTY;
    if z.is_empty() {
        return p;
    }
    let (m, s) = if o.metrics {
        let o = online_metrics(z, f32::INFINITY);
        let (m, s, spread, max_block) = (o.max, o.sum, o.spread, o.max_block);
        p.nan = s.is_nan() && z.iter().any(|x| x.is_nan());
        p.spread = if s > 0.0 { spread } else { 0.0 };
        // The first column holding the maximum (NaN passed over); a row of −inf: its
        // first column that is not NaN.
        let first = max_block * BLOCK;
        let at = z[first..]
            .iter()
            .position(|&x| x == m)
            .map(|j| first + j)
            .or_else(|| z.iter().position(|x| !x.is_nan()));
        p.argmax = at.map(|j| (base + j, z[j]));
        (m, s)
    } else {
        row_stats(z)
    };
    p.state = crate::RowState { max: m, sum: s as f32 };
    if o.smooth {
        p.smooth = match weights {
            Some(w) => z.chunks(BLOCK).zip(w.chunks(BLOCK)).map(|(z, w)| f64::from(dot(z, w))).sum(),
            None => z.chunks(BLOCK).map(|z| f64::from(z.iter().sum::<f32>())).sum(),
        };
    }
    p.target = local_target.map(|j| z[j]);
    p
}

/// Σ z w over a block, in f32.
#[inline(always)]
fn dot(z: &[f32], w: &[f32]) -> f32 {
    z.iter().zip(w).map(|(&a, &b)| a * b).sum()
}

/// Which optional sums a partial carries.
#[derive(Clone, Copy)]
struct Want {
    metrics: bool,
    smooth: bool,
}

/// The target's column within the shard, for a counted row whose target falls there.
#[inline(always)]
fn local_target(t: i32, shard: &ColumnShard<'_>) -> Option<usize> {
    (t != Batch::IGNORED && shard.columns.contains(&(t as usize))).then(|| t as usize - shard.columns.start)
}

/// The shard's partials, one per row (checked by the caller).
pub(crate) fn partials(shard: &ColumnShard<'_>, batch: &Batch, opts: &LossOptions) -> Vec<VocabPartial> {
    let width = shard.columns.len();
    let mut out = vec![VocabPartial::EMPTY; batch.rows];
    if width == 0 {
        return out;
    }
    let tr = Transform::of(opts);
    let weights = opts.get_weights().map(|w| &w[shard.columns.clone()]);
    let want = Want { metrics: opts.get_metrics().is_some(), smooth: opts.get_label_smoothing() > 0.0 };
    let step = rows_per_task(width);
    out.par_chunks_mut(step).enumerate().for_each(|(k, chunk)| {
        with_scratch(width, tr.transforms(), |buf, _| {
            partial_rows(shard, &batch.targets[k * step..], k * step, chunk, tr, weights, want, buf)
        })
    });
    out
}

multiversion! {
    /// The partials of rows `first ..` into `out` (one task's rows).
    fn partial_rows(
        shard: &ColumnShard<'_>,
        targets: &[i32],
        first: usize,
        out: &mut [VocabPartial],
        tr: Transform,
        weights: Option<&[f32]>,
        want: Want,
        buf: &mut [f32],
    ) {
        let width = shard.columns.len();
        for (i, (p, &t)) in out.iter_mut().zip(targets).enumerate() {
            let r = first + i;
            let z = tr.apply(&shard.logits[r * width..(r + 1) * width], buf, None);
            *p = partial_of(z, shard.columns.start, local_target(t, shard), weights, want);
        }
    }
}

/// The top-k step: for each counted row, `#{c in the shard : z_c > z_target}` (0 for an
/// ignored row or one with no target logit).
pub(crate) fn above(
    shard: &ColumnShard<'_>,
    batch: &Batch,
    target_logits: &[Option<f32>],
    opts: &LossOptions,
) -> Vec<u64> {
    let width = shard.columns.len();
    let mut out = vec![0u64; batch.rows];
    if width == 0 {
        return out;
    }
    let tr = Transform::of(opts);
    let step = rows_per_task(width);
    out.par_chunks_mut(step).enumerate().for_each(|(k, chunk)| {
        with_scratch(width, tr.transforms(), |buf, _| {
            for (i, n) in chunk.iter_mut().enumerate() {
                let r = k * step + i;
                if let (true, Some(zt)) = (batch.targets[r] != Batch::IGNORED, target_logits[r]) {
                    let z = tr.apply(&shard.logits[r * width..(r + 1) * width], buf, None);
                    *n = z.iter().filter(|&&x| x > zt).count() as u64;
                }
            }
        })
    });
    out
}

/// The shard's gradient columns from the merged (max, sum) states, times the upstream
/// gradient, into `out` [rows, width] (checked by the caller): the reference's rule
/// (`ClassGrad`) with `p = exp(z − max) / sum` and its row constants rounded to f32 once.
pub(crate) fn gradient(
    shard: &ColumnShard<'_>,
    batch: &Batch,
    states: &[crate::RowState],
    upstream: Upstream<'_>,
    opts: &LossOptions,
    out: &mut [f32],
) {
    let (v, width) = (shard.classes, shard.columns.len());
    if width == 0 {
        return;
    }
    let reduction = opts.get_reduction();
    let eps = opts.get_label_smoothing();
    let weights = opts.get_weights();
    let total_w = weights.map_or(v as f64, |w| w.iter().map(|&x| f64::from(x)).sum());
    let d = batch.divisor(reduction);
    let ce_scale = if d != 0.0 { 1.0 / d } else { 0.0 };
    let z_scale = 1.0 / batch.z_divisor(reduction);
    let s = opts.get_z_loss();
    let tr = Transform::of(opts);
    let shard_w = weights.map(|w| &w[shard.columns.clone()]);
    let step = rows_per_task(width);
    let c = GradConsts { v, eps, total_w, ce_scale, z_scale, s, weights, shard_w };
    out.par_chunks_mut(step * width).enumerate().for_each(|(k, chunk)| {
        // The slopes dz/dx are written whatever the transform.
        with_scratch(width, true, |zb, dzb| {
            grad_rows(shard, batch, states, upstream, k * step, chunk, tr, &c, zb, dzb)
        })
    });
}

/// A gradient's constants over rows.
struct GradConsts<'a> {
    v: usize,
    eps: f64,
    total_w: f64,
    ce_scale: f64,
    z_scale: f64,
    s: f64,
    weights: Option<&'a [f32]>,
    shard_w: Option<&'a [f32]>,
}

multiversion! {
    /// The gradient of rows `first ..` into `out` (one task's rows).
    fn grad_rows(
        shard: &ColumnShard<'_>,
        batch: &Batch,
        states: &[crate::RowState],
        upstream: Upstream<'_>,
        first: usize,
        out: &mut [f32],
        tr: Transform,
        c: &GradConsts<'_>,
        zb: &mut [f32],
        dzb: &mut [f32],
    ) {
        let width = shard.columns.len();
        let GradConsts { v, eps, total_w, ce_scale, z_scale, s, weights, shard_w } = *c;
        for (i, g) in out.chunks_mut(width).enumerate() {
            let r = first + i;
            let t = batch.targets[r];
            if t == Batch::IGNORED {
                g.fill(0.0);
                continue;
            }
            let y = t as usize;
            let up = f64::from(upstream.of_row(r));
            let st = states[r];
            let l = f64::from(st.max) + f64::from(st.sum).ln();
            let w_y = weights.map_or(1.0, |w| f64::from(w[y]));
            let mut kk = (1.0 - eps) * w_y;
            if eps > 0.0 {
                kk += eps / v as f64 * total_w;
            }
            // Everything a column needs, scaled once: g = (e·a − b_c) · dz with
            // e = exp(z − max) and 1 / sum folded into a.
            let a = (kk * ce_scale + if s > 0.0 { 2.0 * s * l * z_scale } else { 0.0 }) * up / f64::from(st.sum);
            let hit = ((1.0 - eps) * w_y * ce_scale * up) as f32;
            let smooth = (eps / v as f64 * ce_scale * up) as f32;
            let (a, lf) = (a as f32, st.max);
            let z = tr.apply(&shard.logits[r * width..(r + 1) * width], zb, Some(dzb));
            match (eps > 0.0, shard_w) {
                (false, _) => g.iter_mut().zip(z).zip(&*dzb).for_each(|((o, &x), &d)| *o = exp_f32(x - lf) * a * d),
                (true, None) => g.iter_mut().zip(z).zip(&*dzb).for_each(|((o, &x), &d)| *o = (exp_f32(x - lf) * a - smooth) * d),
                (true, Some(w)) => g
                    .iter_mut()
                    .zip(z)
                    .zip(&*dzb)
                    .zip(w)
                    .for_each(|(((o, &x), &d), &w)| *o = (exp_f32(x - lf) * a - smooth * w) * d),
            }
            if shard.columns.contains(&y) {
                let j = y - shard.columns.start;
                g[j] -= hit * dzb[j];
            }
        }
    }
}
