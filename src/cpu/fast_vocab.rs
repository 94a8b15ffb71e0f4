//! The fast CPU path's half of [`crate::vocab`]: a shard's per-row partials, the top-k
//! counts of its second step, and its gradient columns from the merged LSE, in f32 lanes
//! (the fast path's `exp`, its blocked online softmax) over rayon's threads, a block of
//! rows a task. Each row is computed alone, so the result does not depend on the threads.

use rayon::prelude::*;

use super::fast::{exp_f32, row_stats};
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

    /// The transformed row (the row itself when plain, else written into `z`), with the
    /// slope dz/dx into `dz` when given.
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

/// `Σ exp(z − m) (z − m)` in f32 lanes a block, f64 across (masked classes add 0).
fn spread(z: &[f32], m: f32) -> f64 {
    z.chunks(64)
        .map(|b| {
            let mut acc = [0.0f32; 16];
            for (i, &x) in b.iter().enumerate() {
                let d = x - m;
                let e = exp_f32(d);
                acc[i % 16] += if e != 0.0 { e * d } else { 0.0 };
            }
            f64::from(acc.iter().sum::<f32>())
        })
        .sum()
}

/// One row's partial over the shard's columns (transformed logits `z`).
fn partial_of(
    z: &[f32],
    base: usize,
    local_target: Option<usize>,
    weights: Option<&[f32]>,
    o: Want,
) -> VocabPartial {
    let (m, s) = row_stats(z);
    let mut p = VocabPartial::EMPTY;
    if z.is_empty() {
        return p;
    }
    p.state = crate::RowState { max: m, sum: s as f32 };
    if o.spread {
        p.nan = z.iter().any(|x| x.is_nan());
        if s > 0.0 {
            p.spread = spread(z, m);
        }
    }
    if o.smooth {
        p.smooth = match weights {
            Some(w) => z.iter().zip(w).map(|(&x, &w)| f64::from(w) * f64::from(x)).sum(),
            None => z.iter().map(|&x| f64::from(x)).sum(),
        };
    }
    // The first column holding the maximum (NaN passed over); a row of −inf: its first
    // column that is not NaN.
    let at = z.iter().position(|&x| x == m).or_else(|| z.iter().position(|x| !x.is_nan()));
    p.argmax = at.map(|j| (base + j, z[j]));
    p.target = local_target.map(|j| z[j]);
    p
}

/// Which optional sums a partial carries.
#[derive(Clone, Copy)]
struct Want {
    spread: bool,
    smooth: bool,
}

/// The target's column within the shard, for a counted row whose target falls there.
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
    let want = Want { spread: opts.get_metrics().is_some(), smooth: opts.get_label_smoothing() > 0.0 };
    let step = rows_per_task(width);
    out.par_chunks_mut(step).enumerate().for_each_init(
        || vec![0.0f32; width],
        |buf, (k, chunk)| {
            for (i, p) in chunk.iter_mut().enumerate() {
                let r = k * step + i;
                let z = tr.apply(&shard.logits[r * width..(r + 1) * width], buf, None);
                *p = partial_of(z, shard.columns.start, local_target(batch.targets[r], shard), weights, want);
            }
        },
    );
    out
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
    out.par_chunks_mut(step).enumerate().for_each_init(
        || vec![0.0f32; width],
        |buf, (k, chunk)| {
            for (i, n) in chunk.iter_mut().enumerate() {
                let r = k * step + i;
                if let (true, Some(zt)) = (batch.targets[r] != Batch::IGNORED, target_logits[r]) {
                    let z = tr.apply(&shard.logits[r * width..(r + 1) * width], buf, None);
                    *n = z.iter().filter(|&&x| x > zt).count() as u64;
                }
            }
        },
    );
    out
}

/// The shard's gradient columns from the merged LSE, times the upstream gradient, into
/// `out` [rows, width] (checked by the caller): the reference's rule (`ClassGrad`) with
/// its row constants rounded to f32 once.
pub(crate) fn gradient(
    shard: &ColumnShard<'_>,
    batch: &Batch,
    lse: &[f32],
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
    out.par_chunks_mut(step * width).enumerate().for_each_init(
        || (vec![0.0f32; width], vec![0.0f32; width]),
        |(zb, dzb), (k, chunk)| {
            for (i, g) in chunk.chunks_mut(width).enumerate() {
                let r = k * step + i;
                let t = batch.targets[r];
                if t == Batch::IGNORED {
                    g.fill(0.0);
                    continue;
                }
                let y = t as usize;
                let up = f64::from(upstream.of_row(r));
                let l = f64::from(lse[r]);
                let w_y = weights.map_or(1.0, |w| f64::from(w[y]));
                let mut kk = (1.0 - eps) * w_y;
                if eps > 0.0 {
                    kk += eps / v as f64 * total_w;
                }
                // Everything a column needs, scaled once: g = (p·a − b_c) · dz.
                let a = (kk * ce_scale + if s > 0.0 { 2.0 * s * l * z_scale } else { 0.0 }) * up;
                let hit = ((1.0 - eps) * w_y * ce_scale * up) as f32;
                let smooth = (eps / v as f64 * ce_scale * up) as f32;
                let (a, lf) = (a as f32, lse[r]);
                let z = tr.apply(&shard.logits[r * width..(r + 1) * width], zb, Some(dzb));
                for (j, (o, &x)) in g.iter_mut().zip(z).enumerate() {
                    let mut b = if eps > 0.0 { smooth * shard_w.map_or(1.0, |w| w[j]) } else { 0.0 };
                    if shard.columns.start + j == y {
                        b += hit;
                    }
                    *o = (exp_f32(x - lf) * a - b) * dzb[j];
                }
            }
        },
    );
}
