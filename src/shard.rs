//! Row-parallel evaluation over several paths ([`RowShards`]): each path takes a
//! contiguous block of rows, on a thread of its own, and the host merges in row order
//! (`shared/docs/semantics.md`, "Sharded (parallel) evaluation"). Every block is divided
//! by the whole batch's `mean` denominators, so the merge is a sum of the blocks' losses
//! and z-loss parts, the row losses, LSE and `dh` side by side, `dW` and `db` summed in
//! shard order, and the metrics' sums combined: nothing but per-row values and a few sums
//! crosses between paths, and a fixed set of paths gives the same bits every run.
//!
//! ```
//! use xent::{Backend, CpuFast, Gradient, Labels, Logits, LossOptions, Problem, Reference, RowShards};
//! let logits: Vec<f32> = (0..5 * 4).map(|i| (i % 7) as f32 * 0.5).collect();
//! let targets = [0i64, 3, 1, 2, 0];
//! let shards = RowShards::new(vec![Box::new(Reference), Box::new(CpuFast)])?;
//! let problem = |l| Problem::new(Logits::F32(l), 4, Labels::from(&targets)).gradient(Gradient::Owned);
//! let split = shards.evaluate(problem(&logits), &LossOptions::new())?;
//! let whole = Reference.evaluate(problem(&logits), &LossOptions::new())?;
//! assert!((split.loss.unwrap() - whole.loss.unwrap()).abs() < 1e-6);
//! # Ok::<(), xent::Error>(())
//! ```

use std::ops::Range;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::head::{GradientTo, HeadGradients, LinearHead, Values};
use crate::options::{HalfFormat, LossOptions, LossOutput, Reduction, Upstream};
use crate::problem::{Gradient, Labels, Logits, Mode, Problem};

/// Several paths that share the rows of every problem: a [`Backend`] like the others.
///
/// Rows go to the paths in order, in blocks as even as whole rows allow (a batch with
/// fewer rows than paths uses the first ones). Any path may be in the set — the adapters
/// of one host ([`RowShards::adapters`]), the fast CPU path beside a GPU, the same path
/// twice. Every shard runs to its end; the first error in shard order is returned.
pub struct RowShards {
    paths: Vec<Box<dyn Backend>>,
}

impl std::fmt::Debug for RowShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowShards").field("paths", &self.describe()).finish()
    }
}

impl RowShards {
    /// The paths, in the order their blocks of rows take; at least one.
    pub fn new(paths: Vec<Box<dyn Backend>>) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::InvalidOption("row shards need at least one path".into()));
        }
        Ok(Self { paths })
    }

    /// One [`GpuContext`] for every adapter whose name contains `name` (every adapter for
    /// `None`), in wgpu's order.
    pub fn adapters(name: Option<&str>) -> Result<Self> {
        Self::new(adapter_paths(name)?)
    }

    /// The paths, in shard order.
    pub fn paths(&self) -> &[Box<dyn Backend>] {
        &self.paths
    }

    /// The blocks of `rows` rows, one per path that takes part (at most `rows` of them).
    pub fn blocks(&self, rows: usize) -> Vec<Range<usize>> {
        let parts = self.paths.len().min(rows).max(1);
        (0..parts).map(|k| rows * k / parts..rows * (k + 1) / parts).collect()
    }
}

impl Backend for RowShards {
    fn describe(&self) -> String {
        let names: Vec<String> = self.paths.iter().map(|p| p.describe()).collect();
        format!("rows over {} paths: {}", names.len(), names.join("; "))
    }

    fn evaluate(&self, problem: Problem<'_>, opts: &LossOptions) -> Result<LossOutput> {
        let rows = crate::front::check(&problem, opts)?;
        let blocks = self.blocks(rows);
        if blocks.len() == 1 {
            return self.paths[0].evaluate(problem, opts);
        }
        let mut block_opts = opts.clone();
        block_opts.denominators = Some(crate::front::denominators(&problem, opts, rows)?);
        let reduced = matches!(problem.mode, Mode::Fused) && opts.get_reduction() != Reduction::None;
        let (parts, sums) = split(problem, &blocks);
        let outs: Vec<Result<LossOutput>> = std::thread::scope(|s| {
            let running: Vec<_> = parts
                .into_iter()
                .zip(&self.paths)
                .map(|(part, path)| {
                    let o = &block_opts;
                    s.spawn(move || path.evaluate(part, o))
                })
                .collect();
            running.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        let outs = outs.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(merge(outs, reduced, sums))
    }
}

/// One [`GpuContext`] for every adapter whose name contains `name` (every adapter for
/// `None`), in wgpu's order: the paths of a set of shards over one host's devices.
pub(crate) fn adapter_paths(name: Option<&str>) -> Result<Vec<Box<dyn Backend>>> {
    crate::gpu::select_adapters(name)?
        .iter()
        .map(|a| GpuContext::from_adapter_blocking(a).map(|g| Box::new(g) as Box<dyn Backend>))
        .collect()
}

/// Where a linear head's `dW` and `db` go in the whole problem: the shards return theirs
/// owned, summed here in shard order.
struct HeadSums<'a> {
    weight: GradientTo<'a>,
    bias: GradientTo<'a>,
    format: Option<HalfFormat>,
}

/// Cuts `s` into consecutive pieces of `lens` elements.
fn cut<T>(mut s: &mut [T], lens: impl IntoIterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for l in lens {
        let (a, b) = std::mem::take(&mut s).split_at_mut(l);
        out.push(a);
        s = b;
    }
    out
}

/// Rows `r` of values `width` wide.
fn rows_of<'a>(v: Values<'a>, r: &Range<usize>, width: usize) -> Values<'a> {
    let e = r.start * width..r.end * width;
    match v {
        Values::F32(x) => Values::F32(&x[e]),
        Values::Half(x, f) => Values::Half(&x[e], f),
    }
}

/// A gradient of `width` values a row, cut into the blocks' rows.
fn cut_to<'a>(to: GradientTo<'a>, blocks: &[Range<usize>], width: usize) -> Vec<GradientTo<'a>> {
    let lens = blocks.iter().map(|r| r.len() * width);
    match to {
        GradientTo::Skip => blocks.iter().map(|_| GradientTo::Skip).collect(),
        GradientTo::Owned => blocks.iter().map(|_| GradientTo::Owned).collect(),
        GradientTo::IntoF32(g) => cut(g, lens).into_iter().map(GradientTo::IntoF32).collect(),
        GradientTo::IntoHalf(g) => cut(g, lens).into_iter().map(GradientTo::IntoHalf).collect(),
    }
}

/// The shards' problems, rows `blocks` each, and where the head's summed gradients go.
fn split<'a>(problem: Problem<'a>, blocks: &[Range<usize>]) -> (Vec<Problem<'a>>, HeadSums<'a>) {
    let Problem { logits, classes: v, labels, gradient, mode, row_losses, lse } = problem;
    let elems: Vec<Range<usize>> = blocks.iter().map(|r| r.start * v..r.end * v).collect();
    let lens = || elems.iter().map(|e| e.len());
    let mut sums = HeadSums { weight: GradientTo::Skip, bias: GradientTo::Skip, format: None };
    if matches!(logits, Logits::Linear(_)) && matches!(gradient, Gradient::Owned) {
        // Every gradient of the head owned: the shards return theirs, summed here.
        (sums.weight, sums.bias) = (GradientTo::Owned, GradientTo::Owned);
    }
    let logit_parts: Vec<Logits<'a>> = match logits {
        Logits::F32(x) => elems.iter().map(|e| Logits::F32(&x[e.clone()])).collect(),
        Logits::Half(x, f) => elems.iter().map(|e| Logits::Half(&x[e.clone()], f)).collect(),
        Logits::F32Mut(x) => cut(x, lens()).into_iter().map(Logits::F32Mut).collect(),
        Logits::HalfMut(x, f) => cut(x, lens()).into_iter().map(|x| Logits::HalfMut(x, f)).collect(),
        Logits::Linear(head) => {
            sums.format = head.dtype().half();
            let d = head.dim;
            blocks
                .iter()
                .map(|r| Logits::Linear(LinearHead { hidden: rows_of(head.hidden, r, d), ..head }))
                .collect()
        }
    };
    let gradient_parts: Vec<Gradient<'a>> = match gradient {
        Gradient::None => blocks.iter().map(|_| Gradient::None).collect(),
        Gradient::Owned => blocks.iter().map(|_| Gradient::Owned).collect(),
        Gradient::InPlace => blocks.iter().map(|_| Gradient::InPlace).collect(),
        Gradient::IntoF32(g) => cut(g, lens()).into_iter().map(Gradient::IntoF32).collect(),
        Gradient::IntoHalf(g) => cut(g, lens()).into_iter().map(Gradient::IntoHalf).collect(),
        Gradient::Linear(HeadGradients { hidden, weight, bias }) => {
            let dim = match &logit_parts[0] {
                Logits::Linear(h) => h.dim,
                _ => 0,
            };
            let owned_if =
                |to: &GradientTo<'_>| if to.wanted() { GradientTo::Owned } else { GradientTo::Skip };
            let parts = cut_to(hidden, blocks, dim)
                .into_iter()
                .map(|hidden| {
                    Gradient::Linear(HeadGradients {
                        hidden,
                        weight: owned_if(&weight),
                        bias: owned_if(&bias),
                    })
                })
                .collect();
            sums.weight = weight;
            sums.bias = bias;
            parts
        }
    };
    let label_parts: Vec<Labels<'a>> = blocks
        .iter()
        .zip(&elems)
        .map(|(r, e)| match labels {
            Labels::Classes(t) => Labels::Classes(t.slice(r.clone())),
            Labels::Probabilities(t) => Labels::Probabilities(&t[e.clone()]),
            Labels::Binary(t) => Labels::Binary(&t[e.clone()]),
        })
        .collect();
    let mode_parts = blocks.iter().zip(&elems).map(|(r, e)| match mode {
        Mode::Fused => Mode::Fused,
        Mode::Backward { lse, upstream } => Mode::Backward {
            lse: lse.map(|l| &l[r.clone()]),
            upstream: match upstream {
                Upstream::PerElement(_) => upstream.slice(e.clone()),
                _ => upstream.slice(r.clone()),
            },
        },
    });
    let parts = logit_parts
        .into_iter()
        .zip(label_parts)
        .zip(gradient_parts)
        .zip(mode_parts)
        .map(|(((logits, labels), gradient), mode)| Problem {
            logits,
            classes: v,
            labels,
            gradient,
            mode,
            row_losses,
            lse,
        })
        .collect();
    (parts, sums)
}

/// The shards' outputs side by side (in row order) and summed.
fn merge(outs: Vec<LossOutput>, reduced: bool, sums: HeadSums<'_>) -> LossOutput {
    let total = |f: fn(&LossOutput) -> Option<f32>| -> Option<f32> {
        let parts: Vec<f32> = outs.iter().filter_map(f).collect();
        (!parts.is_empty()).then(|| parts.iter().map(|&x| f64::from(x)).sum::<f64>() as f32)
    };
    let side_by_side = |f: fn(&LossOutput) -> Option<&Vec<f32>>| -> Option<Vec<f32>> {
        let parts: Option<Vec<&Vec<f32>>> = outs.iter().map(f).collect();
        parts.map(|p| p.iter().flat_map(|v| v.iter().copied()).collect())
    };
    let added = |f: fn(&LossOutput) -> Option<&Vec<f32>>| -> Option<Vec<f32>> {
        let parts: Option<Vec<&Vec<f32>>> = outs.iter().map(f).collect();
        parts.map(|p| {
            let mut acc = vec![0.0f64; p[0].len()];
            for part in p {
                acc.iter_mut().zip(part).for_each(|(a, &x)| *a += f64::from(x));
            }
            acc.into_iter().map(|x| x as f32).collect()
        })
    };
    let mut out = LossOutput {
        loss: if reduced { total(|o| o.loss) } else { None },
        row_losses: side_by_side(|o| o.row_losses.as_ref()),
        lse: side_by_side(|o| o.lse.as_ref()),
        gradient: side_by_side(|o| o.gradient.as_ref()),
        z_loss: if reduced { total(|o| o.z_loss) } else { None },
        grad_hidden: side_by_side(|o| o.grad_hidden.as_ref()),
        grad_weight: None,
        grad_bias: None,
        metrics: None,
    };
    let dw = added(|o| o.grad_weight.as_ref());
    let db = added(|o| o.grad_bias.as_ref());
    out.grad_weight = deliver(sums.weight, dw, sums.format);
    out.grad_bias = deliver(sums.bias, db, sums.format);
    out.metrics = outs.into_iter().fold(None, |all, o| crate::Metrics::join(all, o.metrics));
    out
}

/// A summed head gradient to where the caller asked for it: owned (returned), into an
/// f32 slice, or into a half slice rounded once.
fn deliver(to: GradientTo<'_>, sum: Option<Vec<f32>>, format: Option<HalfFormat>) -> Option<Vec<f32>> {
    match (to, sum) {
        (GradientTo::IntoF32(g), Some(s)) => {
            g.copy_from_slice(&s);
            None
        }
        (GradientTo::IntoHalf(g), Some(s)) => {
            let f = format.expect("checked: half inputs");
            g.iter_mut().zip(&s).for_each(|(h, &x)| *h = f.from_f32(x));
            None
        }
        (GradientTo::Skip, _) => None,
        // The whole problem's `Gradient::Owned`: every shard returned its part owned.
        (_, sum) => sum,
    }
}
