//! Behind the front door: the checks every path runs before any work, and the
//! composition of the cells a path does not compute itself from those it does.
//!
//! Each path ([`Native`]) computes a core of the support matrix natively — at least f32
//! logits × every label kind × {loss only, gradient into an f32 slice, backward into an
//! f32 slice} — and says which other cells it takes itself (the GPU reads half-precision
//! logits in its kernels and writes the gradient in place, for example). Every other cell
//! is composed here on the same path, never on another one: an owned gradient is an f32
//! slice the door allocates; half-precision logits, in-place gradients and gradients in
//! the input's type go through [`by_blocks`], which hands the path row blocks widened to
//! f32 (at most [`BLOCK_ELEMS`] elements at a time, so no N×V copy) with the whole
//! batch's `mean` denominators, and rounds each block's gradient once into its
//! destination.

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::head::{GradientTo, HeadGradients, LinearTask};
use crate::options::{
    Batch, LossOptions, LossOutput, Reduction, Targets, Upstream, check_binary, check_soft,
};
use crate::problem::{Gradient, LabelKind, Labels, Logits, LogitsRef, Mode, Problem, check_shape};

/// Elements of one row block of [`by_blocks`] (16 MiB of f32), at least one row.
pub(crate) const BLOCK_ELEMS: usize = 1 << 22;

static BLOCK_ELEMS_NOW: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(BLOCK_ELEMS);

/// Sets the elements of one row block of the front door's composition (default 4M), so
/// that tests reach block boundaries with small problems. Results do not depend on it
/// beyond f32 rounding.
#[doc(hidden)]
pub fn set_block_elems(elems: usize) {
    BLOCK_ELEMS_NOW.store(elems.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// A path's own computations.
pub(crate) trait Native: Backend {
    /// Whether the path computes `problem` itself. It must for f32 logits with a gradient
    /// of [`Gradient::None`] or [`Gradient::IntoF32`], fused or backward, for every label
    /// kind. Never called with [`Gradient::Owned`].
    fn takes(&self, problem: &Problem<'_>, opts: &LossOptions) -> bool;

    /// Evaluates a problem that [`takes`](Self::takes) accepted; its shape and options
    /// have been checked, and it has at least one row.
    fn native(&self, problem: Problem<'_>, opts: &LossOptions) -> Result<LossOutput>;

    /// Evaluates a checked linear head: the loss (unless a backward), the row losses and
    /// LSE when asked, the z-loss part, and every gradient the task has a slice for,
    /// never storing the [rows, classes] logits.
    fn linear(&self, task: LinearTask<'_>, opts: &LossOptions) -> Result<LossOutput>;
}

/// The front door of every path: checks, then the path's own computation or a
/// composition of it.
pub(crate) fn evaluate<B: Native>(path: &B, problem: Problem<'_>, opts: &LossOptions) -> Result<LossOutput> {
    let rows = check(&problem, opts)?;
    if matches!(problem.logits, Logits::Linear(_)) {
        return linear(path, problem, opts, rows);
    }
    if matches!(problem.gradient, Gradient::Owned) {
        let mut grad = vec![0.0f32; problem.logits.len()];
        let mut out = evaluate(path, Problem { gradient: Gradient::IntoF32(&mut grad), ..problem }, opts)?;
        out.gradient = Some(grad);
        return Ok(out);
    }
    if rows == 0 {
        return Ok(empty(&problem, opts));
    }
    if path.takes(&problem, opts) {
        return path.native(problem, opts);
    }
    by_blocks(path, problem, opts, rows)
}

/// Every input check of a problem, before any work: shapes, options for its label kind,
/// class-index targets in range. Returns the number of rows.
pub(crate) fn check(problem: &Problem<'_>, opts: &LossOptions) -> Result<usize> {
    let rows = check_shape(problem)?;
    if opts.get_metrics().is_some() && matches!(problem.mode, Mode::Backward { .. }) {
        return Err(Error::InvalidOption(
            "metrics come from a fused evaluation (they need the forward's row state), not a backward".into(),
        ));
    }
    let n = problem.logits.len();
    let v = problem.classes;
    match problem.labels {
        Labels::Classes(t) => {
            Batch::new(n, v, t, opts)?;
        }
        Labels::Probabilities(t) => {
            check_soft(n, t.len(), v, opts)?;
        }
        Labels::Binary(t) => {
            check_binary(n, t.len(), v, opts)?;
            if problem.lse {
                return Err(Error::InvalidOption("binary cross-entropy has no per-row LSE".into()));
            }
        }
    }
    Ok(rows)
}

/// The result for an empty batch: NaN for `mean` (0/0, as in PyTorch) unless the caller
/// gave `n_items`, 0 for `sum`, empty vectors.
pub(crate) fn empty(problem: &Problem<'_>, opts: &LossOptions) -> LossOutput {
    let backward = matches!(problem.mode, Mode::Backward { .. });
    let loss = match opts.get_reduction() {
        _ if backward => None,
        Reduction::None => None,
        Reduction::Sum => Some(0.0),
        Reduction::Mean => Some(opts.get_n_items().map_or(f32::NAN, |_| 0.0)),
    };
    let z_on = opts.get_z_loss() > 0.0 && problem.labels.kind() != LabelKind::Binary;
    LossOutput {
        loss,
        row_losses: (!backward && wants_row_losses(problem, opts)).then(Vec::new),
        lse: (!backward && problem.lse).then(Vec::new),
        gradient: None,
        z_loss: if z_on { loss.map(|l| if l.is_nan() { l } else { 0.0 }) } else { None },
        metrics: opts.get_metrics().map(|spec| crate::Metrics::from_rows(spec, &[])),
        ..Default::default()
    }
}

/// Whether the row losses are returned: always for `none`, else when asked.
pub(crate) fn wants_row_losses(problem: &Problem<'_>, opts: &LossOptions) -> bool {
    problem.row_losses || opts.get_reduction() == Reduction::None
}

/// The options with the outputs of `problem` set, for the paths' own functions (which
/// read what to produce from the options).
pub(crate) fn with_outputs(problem: &Problem<'_>, opts: &LossOptions) -> LossOptions {
    opts.clone()
        .gradient(!matches!(problem.gradient, Gradient::None))
        .row_losses(problem.row_losses)
        .lse(problem.lse)
}

/// Evaluates `problem` in row blocks of f32 that `path` takes itself: half-precision
/// logits are widened a block at a time, the gradient of each block is written (rounded
/// once for a half destination) where the problem says — over the logits for in place —
/// and the losses are added over the blocks, each block divided by the whole batch's
/// `mean` denominators.
pub(crate) fn by_blocks<B: Native>(
    path: &B,
    mut problem: Problem<'_>,
    opts: &LossOptions,
    rows: usize,
) -> Result<LossOutput> {
    let v = problem.classes;
    let mut block_opts = opts.clone();
    block_opts.denominators = Some(denominators(&problem, opts, rows)?);
    let backward = matches!(problem.mode, Mode::Backward { .. });
    let want_grad = !matches!(problem.gradient, Gradient::None);
    let want_rows = !backward && wants_row_losses(&problem, opts);
    let want_lse = !backward && problem.lse;
    let reduced = !backward && opts.get_reduction() != Reduction::None;
    let block_rows = (BLOCK_ELEMS_NOW.load(std::sync::atomic::Ordering::Relaxed) / v).clamp(1, rows);
    let mut wide: Vec<f32> = Vec::new();
    let mut grad: Vec<f32> = Vec::new();
    let (mut loss, mut z_loss, mut any_z) = (0.0f64, 0.0f64, false);
    let mut row_losses = want_rows.then(|| Vec::with_capacity(rows));
    let mut lse = want_lse.then(|| Vec::with_capacity(rows));
    let mut metrics: Option<crate::Metrics> = None;
    for r0 in (0..rows).step_by(block_rows) {
        let r1 = (r0 + block_rows).min(rows);
        let elems = r0 * v..r1 * v;
        let labels = match problem.labels {
            Labels::Classes(t) => Labels::Classes(t.slice(r0..r1)),
            Labels::Probabilities(t) => Labels::Probabilities(&t[elems.clone()]),
            Labels::Binary(t) => Labels::Binary(&t[elems.clone()]),
        };
        let mode = match problem.mode {
            Mode::Fused => Mode::Fused,
            Mode::Backward { lse, upstream } => Mode::Backward {
                lse: lse.map(|l| &l[r0..r1]),
                upstream: match upstream {
                    Upstream::PerElement(_) => upstream.slice(elems.clone()),
                    _ => upstream.slice(r0..r1),
                },
            },
        };
        grad.resize(if want_grad { elems.len() } else { 0 }, 0.0);
        let out = {
            let block: &[f32] = match problem.logits.view() {
                Some(LogitsRef::F32(l)) => &l[elems.clone()],
                Some(half @ LogitsRef::Half(..)) => {
                    half.widen_into(elems.clone(), &mut wide);
                    &wide
                }
                None => unreachable!("a linear head is evaluated by front::linear"),
            };
            let sub = Problem {
                logits: Logits::F32(block),
                classes: v,
                labels,
                gradient: if want_grad { Gradient::IntoF32(&mut grad) } else { Gradient::None },
                mode,
                row_losses: want_rows,
                lse: want_lse,
            };
            if !path.takes(&sub, &block_opts) {
                return Err(Error::Unsupported {
                    path: path.describe(),
                    cell: sub.cell().to_string(),
                    why: "the path's core cell is missing".into(),
                });
            }
            path.native(sub, &block_opts)?
        };
        if let Some(l) = out.loss {
            loss += f64::from(l);
        }
        if let Some(z) = out.z_loss {
            z_loss += f64::from(z);
            any_z = true;
        }
        if let (Some(all), Some(part)) = (&mut row_losses, &out.row_losses) {
            all.extend_from_slice(part);
        }
        if let (Some(all), Some(part)) = (&mut lse, &out.lse) {
            all.extend_from_slice(part);
        }
        metrics = crate::Metrics::join(metrics.take(), out.metrics);
        if want_grad {
            write_gradient(&mut problem, elems, &grad);
        }
    }
    Ok(LossOutput {
        loss: reduced.then_some(loss as f32),
        row_losses,
        lse,
        gradient: None,
        z_loss: (reduced && any_z).then_some(z_loss as f32),
        metrics,
        ..Default::default()
    })
}

/// The whole batch's `mean` denominators (cross-entropy part, z-loss part), which every
/// row block (of [`by_blocks`], or of a row shard) divides by.
pub(crate) fn denominators(problem: &Problem<'_>, opts: &LossOptions, rows: usize) -> Result<(f64, f64)> {
    let v = problem.classes;
    Ok(match problem.labels {
        Labels::Classes(t) => {
            let batch = Batch::new(rows * v, v, t, opts)?;
            (batch.mean_denominator, batch.z_denominator)
        }
        Labels::Probabilities(_) => {
            let d = opts.mean_denominator(rows as f64);
            (d, d)
        }
        Labels::Binary(_) => {
            let d = opts.mean_denominator((rows * v) as f64);
            (d, d)
        }
    })
}

/// Writes a block's f32 gradient where the problem says, rounding once to a half type.
fn write_gradient(problem: &mut Problem<'_>, elems: std::ops::Range<usize>, grad: &[f32]) {
    let format = problem.logits.dtype().half();
    match (&mut problem.gradient, &mut problem.logits) {
        (Gradient::IntoF32(g), _) => g[elems].copy_from_slice(grad),
        (Gradient::IntoHalf(g), _) => {
            let f = format.expect("checked: half logits");
            g[elems].iter_mut().zip(grad).for_each(|(h, &x)| *h = f.from_f32(x));
        }
        (Gradient::InPlace, Logits::F32Mut(l)) => l[elems].copy_from_slice(grad),
        (Gradient::InPlace, Logits::HalfMut(l, f)) => {
            l[elems].iter_mut().zip(grad).for_each(|(h, &x)| *h = f.from_f32(x));
        }
        (Gradient::InPlace, _) | (Gradient::None | Gradient::Owned | Gradient::Linear(_), _) => {}
    }
}

impl<'a> Targets<'a> {
    /// The targets of rows `range`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Targets<'a> {
        match *self {
            Targets::I64(t) => Targets::I64(&t[range]),
            Targets::I32(t) => Targets::I32(&t[range]),
        }
    }
}

/// One gradient of a linear head on its way to the caller: an f32 slice the path writes,
/// then (for owned and half destinations) what happens to it.
enum HeadDest<'a> {
    Skip,
    Owned(Vec<f32>),
    IntoF32(&'a mut [f32]),
    IntoHalf(Vec<f32>, &'a mut [u16]),
}

impl<'a> HeadDest<'a> {
    fn new(to: GradientTo<'a>, len: usize) -> Self {
        match to {
            GradientTo::Skip => HeadDest::Skip,
            GradientTo::Owned => HeadDest::Owned(vec![0.0; len]),
            GradientTo::IntoF32(g) => HeadDest::IntoF32(g),
            GradientTo::IntoHalf(g) => HeadDest::IntoHalf(vec![0.0; len], g),
        }
    }
    fn slice(&mut self) -> Option<&mut [f32]> {
        match self {
            HeadDest::Skip => None,
            HeadDest::Owned(g) | HeadDest::IntoHalf(g, _) => Some(g),
            HeadDest::IntoF32(g) => Some(g),
        }
    }
    /// Rounds a half destination once; returns an owned gradient.
    fn finish(self, format: Option<crate::options::HalfFormat>) -> Option<Vec<f32>> {
        match self {
            HeadDest::Owned(g) => Some(g),
            HeadDest::IntoHalf(g, out) => {
                let f = format.expect("checked: half inputs");
                out.iter_mut().zip(&g).for_each(|(h, &x)| *h = f.from_f32(x));
                None
            }
            HeadDest::Skip | HeadDest::IntoF32(_) => None,
        }
    }
}

/// The front door of a linear head (checked by [`check`]): f32 destinations for every
/// asked gradient, an empty batch answered here (zero `dW`, `db`), the path's
/// [`Native::linear`], then owned gradients into the output and half ones rounded once.
fn linear<B: Native>(path: &B, problem: Problem<'_>, opts: &LossOptions, rows: usize) -> Result<LossOutput> {
    let empty_out = (rows == 0).then(|| empty(&problem, opts));
    let want_rows = wants_row_losses(&problem, opts);
    let want_lse = problem.lse;
    let Problem {
        logits: Logits::Linear(head),
        classes,
        labels: Labels::Classes(targets),
        gradient,
        mode,
        ..
    } = problem
    else {
        unreachable!("checked: a linear head with class-index targets")
    };
    let grads = match gradient {
        Gradient::None => HeadGradients::default(),
        Gradient::Owned => HeadGradients::owned(),
        Gradient::Linear(g) => g,
        _ => unreachable!("checked: no gradient over a linear head's logits"),
    };
    let d = head.dim;
    let bias = if head.bias.is_some() { grads.bias } else { GradientTo::Skip };
    let mut dh = HeadDest::new(grads.hidden, rows * d);
    let mut dw = HeadDest::new(grads.weight, classes * d);
    let mut db = HeadDest::new(bias, classes);
    let backward = matches!(mode, Mode::Backward { .. });
    if backward && dh.slice().is_none() && dw.slice().is_none() && db.slice().is_none() {
        return Err(Error::InvalidOption("a backward produces a gradient: say where it goes".into()));
    }
    let mut out = if let Some(out) = empty_out {
        for g in [dh.slice(), dw.slice(), db.slice()].into_iter().flatten() {
            g.fill(0.0);
        }
        out
    } else {
        let task = LinearTask {
            head,
            rows,
            classes,
            batch: Batch::new(rows * classes, classes, targets, opts)?,
            mode,
            grad_hidden: dh.slice(),
            grad_weight: dw.slice(),
            grad_bias: db.slice(),
            row_losses: want_rows,
            lse: want_lse,
        };
        path.linear(task, opts)?
    };
    let format = head.dtype().half();
    out.grad_hidden = dh.finish(format);
    out.grad_weight = dw.finish(format);
    out.grad_bias = db.finish(format);
    Ok(out)
}
