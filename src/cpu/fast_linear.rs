//! The fast CPU path of the linear head `x = h Wᵀ + b` (Liger-style row chunking): the
//! rows go in blocks of at most [`BLOCK_ELEMS`] logits (and [`MAX_BLOCK_ROWS`] rows), so
//! that [N, V] is never stored. For each block:
//!
//! 1. the logits block `h_blk · Wᵀ (+ b)` by one GEMM (the `gemm` crate, on rayon's pool);
//! 2. the fused row computations of [`super::fast`] on it — loss, LSE and, for a
//!    gradient, `G = ∂loss/∂x` written over the block — with the whole batch's `mean`
//!    denominators (as the front door's row blocks pass them), or for a backward `G`
//!    from the saved LSE times the upstream gradient;
//! 3. `dh_blk = G · W`, `dW (+)= Gᵀ · h_blk` (two GEMMs; `dW` is overwritten by the first
//!    block and accumulated in f32 by the next ones, in block order) and `db += Σ_rows G`
//!    (f64 per class, rows in order, rounded once at the end).
//!
//! Ignored rows have `G = 0` and so add nothing. Every sum runs in a fixed order (the
//! GEMM splits only the output between threads, never the inner dimension), so results
//! are bit-identical run to run and whatever the number of threads. Half-precision `h`
//! and `W` are widened to f32 (`W` once per call, `h` per block) and everything is
//! computed in f32.

use std::borrow::Cow;

use rayon::prelude::*;

use super::fast;
use crate::error::Result;
use crate::head::{LinearTask, Values};
use crate::options::{Batch, LossOptions, LossOutput, Reduction, Targets};
use crate::problem::Mode;

/// Logits of one row block (32 MiB of f32), at least one row.
pub(crate) const BLOCK_ELEMS: usize = 1 << 23;
/// Rows of one block at most: the products are as fast from about 256 rows on, and
/// smaller blocks keep the memory down for small vocabularies.
pub(crate) const MAX_BLOCK_ROWS: usize = 256;

/// Rows per block for `rows` rows of `v` classes.
pub(crate) fn block_rows(rows: usize, v: usize) -> usize {
    (BLOCK_ELEMS / v.max(1)).clamp(1, MAX_BLOCK_ROWS).min(rows.max(1))
}

/// A row-major matrix operand: its values, the stride between rows and between
/// columns.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// `rows × cols` row major.
    pub(crate) fn rows(data: &'a [f32], cols: usize) -> Self {
        Self { data, row_stride: cols, col_stride: 1 }
    }
    /// The transpose of `data` held `cols × rows` row major (so this is `rows × cols`).
    pub(crate) fn transposed(data: &'a [f32], rows: usize) -> Self {
        Self { data, row_stride: 1, col_stride: rows }
    }
    /// Asserts that an `m × n` view fits in the slice.
    fn check(&self, m: usize, n: usize) {
        let last = (m - 1) * self.row_stride + (n - 1) * self.col_stride;
        assert!(last < self.data.len(), "operand of {m} × {n} over {} values", self.data.len());
    }
}

/// `dst [m, n] (row major) = a [m, k] · b [k, n]`, plus `dst` itself when `accumulate`
/// (else `dst` is not read). Multi-threaded on the current rayon pool; the inner
/// dimension is summed in the same order whatever the number of threads.
pub(crate) fn matmul(
    dst: &mut [f32],
    a: Mat<'_>,
    b: Mat<'_>,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() >= m * n, "destination of {m} × {n} over {} values", dst.len());
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    a.check(m, k);
    b.check(k, n);
    let s = |x: usize| x as isize;
    // SAFETY: every operand's extent was checked against its slice above; `dst` is a
    // unique borrow of at least m · n values, written row major (column stride 1, row
    // stride n), and does not alias `a` or `b` (shared borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            s(n),
            accumulate,
            a.data.as_ptr(),
            s(a.col_stride),
            s(a.row_stride),
            b.data.as_ptr(),
            s(b.col_stride),
            s(b.row_stride),
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// Values as f32: borrowed when they are, else widened in parallel.
pub(crate) fn widen(values: Values<'_>) -> Cow<'_, [f32]> {
    match values {
        Values::F32(x) => Cow::Borrowed(x),
        Values::Half(x, f) => {
            let mut out = vec![0.0f32; x.len()];
            out.par_chunks_mut(1 << 16).zip(x.par_chunks(1 << 16)).for_each(|(o, x)| {
                o.iter_mut().zip(x).for_each(|(o, &h)| *o = f.to_f32(h));
            });
            Cow::Owned(out)
        }
    }
}

/// `acc[c] += Σ_r g[r, c]` in f64, rows in order, columns in parallel.
pub(crate) fn add_column_sums(acc: &mut [f64], g: &[f32], v: usize) {
    const COLS: usize = 1024;
    acc.par_chunks_mut(COLS).enumerate().for_each(|(i, acc)| {
        let cols = i * COLS..i * COLS + acc.len();
        for row in g.chunks_exact(v) {
            acc.iter_mut().zip(&row[cols.clone()]).for_each(|(a, &x)| *a += f64::from(x));
        }
    });
}

/// Evaluates a checked linear head on the fast CPU path (see the module's documentation).
pub(crate) fn linear(task: LinearTask<'_>, opts: &LossOptions) -> Result<LossOutput> {
    let LinearTask {
        head,
        rows: n,
        classes: v,
        batch,
        mode,
        mut grad_hidden,
        mut grad_weight,
        grad_bias,
        row_losses,
        lse,
    } = task;
    let d = head.dim;
    let backward = matches!(mode, Mode::Backward { .. });
    let want_grad = grad_hidden.is_some() || grad_weight.is_some() || grad_bias.is_some();
    let w = widen(head.weight);
    let bias = head.bias.map(widen);
    // The blocks' own options: the targets are the checked ones (ignored rows marked
    // `Batch::IGNORED`), divided by the whole batch's `mean` denominators.
    let mut block_opts = opts
        .clone()
        .ignore_index(i64::from(Batch::IGNORED))
        .gradient(want_grad && !backward)
        .row_losses(row_losses)
        .lse(lse);
    block_opts.denominators = Some((batch.mean_denominator, batch.z_denominator));
    let step = block_rows(n, v);
    let mut logits = vec![0.0f32; step * v];
    let mut hidden_block = Vec::new();
    let mut bias_sums = grad_bias.as_ref().map(|_| vec![0.0f64; v]);
    let reduced = !backward && opts.get_reduction() != Reduction::None;
    let (mut loss, mut z_loss, mut any_z) = (0.0f64, 0.0f64, false);
    let mut all_rows = (!backward && row_losses).then(|| Vec::with_capacity(n));
    let mut all_lse = (!backward && lse).then(|| Vec::with_capacity(n));
    let mut metrics: Option<crate::Metrics> = None;
    for (block, r0) in (0..n).step_by(step).enumerate() {
        let r1 = (r0 + step).min(n);
        let r = r1 - r0;
        let h: &[f32] = match head.hidden {
            Values::F32(h) => &h[r0 * d..r1 * d],
            half => {
                half.widen_into(r0 * d..r1 * d, &mut hidden_block);
                &hidden_block
            }
        };
        let x = &mut logits[..r * v];
        matmul(x, Mat::rows(h, d), Mat::transposed(&w, d), (r, v, d), false);
        if let Some(b) = &bias {
            x.par_chunks_mut(v).for_each(|row| row.iter_mut().zip(b.iter()).for_each(|(x, &b)| *x += b));
        }
        let targets = Targets::I32(&batch.targets[r0..r1]);
        let saved_grad;
        let g: &[f32] = match mode {
            Mode::Fused => {
                let out = if want_grad {
                    fast::cross_entropy_in_place(x, v, targets, &block_opts)?
                } else {
                    fast::cross_entropy(x, v, targets, &block_opts)?
                };
                if let Some(l) = out.loss {
                    loss += f64::from(l);
                }
                if let Some(z) = out.z_loss {
                    z_loss += f64::from(z);
                    any_z = true;
                }
                if let (Some(all), Some(part)) = (&mut all_rows, &out.row_losses) {
                    all.extend_from_slice(part);
                }
                if let (Some(all), Some(part)) = (&mut all_lse, &out.lse) {
                    all.extend_from_slice(part);
                }
                metrics = crate::Metrics::join(metrics.take(), out.metrics);
                if !want_grad {
                    continue;
                }
                x
            }
            Mode::Backward { lse: saved, upstream } => {
                let saved = saved.expect("checked: a linear backward has its LSE");
                saved_grad = fast::cross_entropy_backward(
                    x,
                    v,
                    targets,
                    &saved[r0..r1],
                    upstream.slice(r0..r1),
                    &block_opts,
                )?;
                &saved_grad
            }
        };
        if let Some(dh) = grad_hidden.as_deref_mut() {
            matmul(&mut dh[r0 * d..r1 * d], Mat::rows(g, v), Mat::rows(&w, d), (r, d, v), false);
        }
        if let Some(dw) = grad_weight.as_deref_mut() {
            matmul(dw, Mat::transposed(g, v), Mat::rows(h, d), (v, d, r), block > 0);
        }
        if let Some(acc) = &mut bias_sums {
            add_column_sums(acc, g, v);
        }
    }
    if let (Some(db), Some(acc)) = (grad_bias, &bias_sums) {
        db.iter_mut().zip(acc).for_each(|(o, &a)| *o = a as f32);
    }
    if backward {
        return Ok(LossOutput::default());
    }
    Ok(LossOutput {
        loss: reduced.then_some(loss as f32),
        row_losses: all_rows,
        lse: all_lse,
        z_loss: (reduced && any_z).then_some(z_loss as f32),
        metrics,
        ..Default::default()
    })
}
