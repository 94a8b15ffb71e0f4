//! Vocabulary-parallel evaluation over several paths of one process ([`VocabShards`]):
//! each path takes a block of the vocabulary's columns of every row, on a thread of its
//! own, and the paths exchange one partial a row through an in-process
//! [`LocalGroup`](crate::collective::LocalGroup) ([`crate::parallel::evaluate_vocab`]).
//!
//! ```
//! use xent::{Backend, CpuFast, Gradient, Labels, Logits, LossOptions, Problem, Reference, VocabShards};
//! let logits: Vec<f32> = (0..4 * 9).map(|i| (i % 5) as f32 * 0.7).collect();
//! let targets = [0i64, 8, 3, 5];
//! let shards = VocabShards::new(vec![Box::new(CpuFast), Box::new(Reference)])?;
//! let problem = |l| Problem::new(Logits::F32(l), 9, Labels::from(&targets)).gradient(Gradient::Owned);
//! let split = shards.evaluate(problem(&logits), &LossOptions::new())?;
//! let whole = Reference.evaluate(problem(&logits), &LossOptions::new())?;
//! assert!((split.loss.unwrap() - whole.loss.unwrap()).abs() < 1e-6);
//! # Ok::<(), xent::Error>(())
//! ```

use std::ops::Range;

use crate::backend::Backend;
use crate::collective::LocalGroup;
use crate::error::{Error, Result};
use crate::options::{LossOptions, LossOutput, Reduction};
use crate::problem::{Gradient, Labels, Logits, Mode, Problem};
use crate::vocab::ColumnShard;

/// Several paths that share the vocabulary of every problem: a [`Backend`] for
/// class-index logits (f32 or half), fused, with the gradient owned, into an f32 slice or
/// into a half slice; any other cell is an [`Error::Unsupported`] naming it (share rows
/// instead: [`RowShards`](crate::RowShards)).
///
/// Columns go to the paths in order, in blocks as even as whole columns allow (a
/// vocabulary smaller than the set uses the first paths). Every shard runs to its end;
/// a failed shard fails the call on every shard ([`crate::collective::agree`]).
pub struct VocabShards {
    paths: Vec<Box<dyn Backend>>,
}

impl std::fmt::Debug for VocabShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VocabShards").field("paths", &self.describe()).finish()
    }
}

impl VocabShards {
    /// The paths, in the order their blocks of columns take; at least one.
    pub fn new(paths: Vec<Box<dyn Backend>>) -> Result<Self> {
        if paths.is_empty() {
            return Err(Error::InvalidOption("vocabulary shards need at least one path".into()));
        }
        Ok(Self { paths })
    }

    /// One [`GpuContext`](crate::GpuContext) for every adapter whose name contains `name` (every adapter for
    /// `None`), in wgpu's order.
    pub fn adapters(name: Option<&str>) -> Result<Self> {
        Self::new(crate::shard::adapter_paths(name)?)
    }

    /// The blocks of `classes` columns, one per path that takes part.
    pub fn blocks(&self, classes: usize) -> Vec<Range<usize>> {
        let parts = self.paths.len().min(classes).max(1);
        (0..parts).map(|k| classes * k / parts..classes * (k + 1) / parts).collect()
    }
}

impl Backend for VocabShards {
    fn describe(&self) -> String {
        let names: Vec<String> = self.paths.iter().map(|p| p.describe()).collect();
        format!("vocabulary over {} paths: {}", names.len(), names.join("; "))
    }

    fn evaluate(&self, problem: Problem<'_>, opts: &LossOptions) -> Result<LossOutput> {
        let rows = crate::front::check(&problem, opts)?;
        let cell = problem.cell();
        let unsupported =
            |why: &str| Error::Unsupported { path: self.describe(), cell: cell.to_string(), why: why.into() };
        let Problem { logits, classes: v, labels, gradient, mode, row_losses, lse } = problem;
        let Labels::Classes(targets) = labels else {
            return Err(unsupported("the vocabulary's shards take class indices: share rows (RowShards)"));
        };
        if !matches!(mode, Mode::Fused) {
            return Err(unsupported("a separate backward needs no exchange: run it on each shard's columns"));
        }
        let half = logits.dtype().half();
        // Each shard copies its columns out of the logits (half ones widened exactly on
        // the way): one pass, no whole f32 copy of half logits.
        let columns_of = |cols: &Range<usize>| -> Vec<f32> {
            match logits {
                Logits::F32(x) => x.chunks(v).flat_map(|r| r[cols.clone()].iter().copied()).collect(),
                Logits::Half(h, f) => {
                    h.chunks(v).flat_map(|r| r[cols.clone()].iter().map(move |&b| f.to_f32(b))).collect()
                }
                _ => unreachable!("checked below"),
            }
        };
        if !matches!(logits, Logits::F32(_) | Logits::Half(..)) {
            return Err(unsupported("in place or a linear head: share rows (RowShards)"));
        }
        let want_grad = match &gradient {
            Gradient::None => false,
            Gradient::Owned | Gradient::IntoF32(_) | Gradient::IntoHalf(_) => true,
            _ => return Err(unsupported("in place or a linear head: share rows (RowShards)")),
        };
        let blocks = self.blocks(v);
        let group = LocalGroup::new(blocks.len());
        let outs: Vec<Result<(LossOutput, Vec<f32>)>> = std::thread::scope(|s| {
            let running: Vec<_> = group
                .iter()
                .zip(&blocks)
                .zip(&self.paths)
                .map(|((c, cols), path)| {
                    let columns_of = &columns_of;
                    s.spawn(move || {
                        let mine = columns_of(cols);
                        let mut g = if want_grad { vec![0.0f32; mine.len()] } else { Vec::new() };
                        let shard = ColumnShard::new(&mine, cols.clone(), v);
                        let grad = want_grad.then_some(&mut g[..]);
                        crate::parallel::evaluate_vocab(c, path.as_ref(), shard, targets, opts, grad)
                            .map(|o| (o, g))
                    })
                })
                .collect();
            running.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        let outs = outs.into_iter().collect::<Result<Vec<_>>>()?;
        let mut whole = want_grad.then(|| vec![0.0f32; rows * v]);
        if let Some(w) = &mut whole {
            for ((_, g), cols) in outs.iter().zip(&blocks) {
                for (row, part) in w.chunks_mut(v).zip(g.chunks(cols.len().max(1))) {
                    row[cols.clone()].copy_from_slice(&part[..cols.len()]);
                }
            }
        }
        let (mut out, _) = outs.into_iter().next().expect("one shard at least");
        if !(row_losses || opts.get_reduction() == Reduction::None) {
            out.row_losses = None;
        }
        if !lse {
            out.lse = None;
        }
        out.gradient = match (gradient, whole) {
            (Gradient::IntoF32(g), Some(w)) => {
                g.copy_from_slice(&w);
                None
            }
            (Gradient::IntoHalf(g), Some(w)) => {
                let f = half.expect("checked by the front door: half logits");
                g.iter_mut().zip(&w).for_each(|(h, &x)| *h = f.from_f32(x));
                None
            }
            (_, w) => w,
        };
        Ok(out)
    }
}
