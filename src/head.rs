//! The linear head as an input of the front door: hidden states `h` [N, D], the
//! classifier weight `W` [V, D] (the layout of PyTorch's `nn.Linear(D, V).weight`) and an
//! optional bias `b` [V]. The logits `x = h Wᵀ + b` are never stored whole on any path:
//! each path computes them in tiles (or row blocks) bounded by its memory budget, keeps
//! per-row state, and forms `dh = G W`, `dW = Gᵀ h`, `db = Σ_rows G` from recomputed
//! tiles of `G = ∂loss/∂x` (`shared/docs/semantics.md`, "Fused linear + cross-entropy").
//!
//! ```
//! use xent::{Backend, Gradient, HeadGradients, LinearHead, LossOptions, Problem, Reference, Values};
//! // N = 2 rows, D = 2, V = 3 classes.
//! let h = [1.0f32, 0.0, 0.0, 1.0];
//! let w = [1.0f32, 0.0, /* class 1 */ 0.0, 1.0, /* class 2 */ -1.0, -1.0];
//! let head = LinearHead::new(Values::F32(&h), Values::F32(&w), 2);
//! let problem = Problem::linear(head, &[0i64, 1]).gradient(Gradient::Linear(HeadGradients::owned()));
//! let out = Reference.evaluate(problem, &LossOptions::new())?;
//! assert!(out.loss.unwrap() > 0.0);
//! assert_eq!(out.grad_weight.unwrap().len(), 6);
//! # Ok::<(), xent::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::options::HalfFormat;
use crate::problem::{Dtype, Output};

/// A read-only run of floating-point values as the caller holds them: f32, or f16/bf16 as
/// raw bits.
#[derive(Clone, Copy, Debug)]
pub enum Values<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// Half-precision values as raw bits.
    Half(&'a [u16], HalfFormat),
}

impl Values<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Values::F32(l) => l.len(),
            Values::Half(l, _) => l.len(),
        }
    }
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The element type.
    pub fn dtype(&self) -> Dtype {
        match self {
            Values::F32(_) => Dtype::F32,
            Values::Half(_, f) => Dtype::of(*f),
        }
    }
    /// Value `i` as f32.
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Values::F32(l) => l[i],
            Values::Half(l, f) => f.to_f32(l[i]),
        }
    }
    /// Values `range` widened to f32 into `out` (cleared first).
    pub fn widen_into(&self, range: std::ops::Range<usize>, out: &mut Vec<f32>) {
        out.clear();
        match self {
            Values::F32(l) => out.extend_from_slice(&l[range]),
            Values::Half(l, f) => out.extend(l[range].iter().map(|&h| f.to_f32(h))),
        }
    }
    /// Every value as f32: borrowed when already f32, else widened into a new vector.
    pub fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Values::F32(l) => std::borrow::Cow::Borrowed(l),
            Values::Half(l, f) => std::borrow::Cow::Owned(l.iter().map(|&h| f.to_f32(h)).collect()),
        }
    }
}

/// The linear head `x = h Wᵀ + b` whose logits are never stored: the input of
/// [`Problem::linear`](crate::Problem::linear).
#[derive(Clone, Copy, Debug)]
pub struct LinearHead<'a> {
    /// Hidden states `h` [rows, dim], row major.
    pub hidden: Values<'a>,
    /// The weight `W` [classes, dim], row major (`nn.Linear(dim, classes).weight`), of the
    /// same element type as `hidden`.
    pub weight: Values<'a>,
    /// The optional bias `b` \[classes\] (f32, or the element type of `hidden`).
    pub bias: Option<Values<'a>>,
    /// The hidden dimension D.
    pub dim: usize,
}

impl<'a> LinearHead<'a> {
    /// The head of `hidden` [rows, dim] and `weight` [classes, dim], no bias.
    pub fn new(hidden: Values<'a>, weight: Values<'a>, dim: usize) -> Self {
        Self { hidden, weight, bias: None, dim }
    }
    /// With the bias \[classes\].
    pub fn bias(mut self, bias: Values<'a>) -> Self {
        self.bias = Some(bias);
        self
    }
    /// Rows N (`hidden.len() / dim`).
    pub fn rows(&self) -> usize {
        self.hidden.len() / self.dim.max(1)
    }
    /// Classes V (`weight.len() / dim`).
    pub fn classes(&self) -> usize {
        self.weight.len() / self.dim.max(1)
    }
    /// The element type of `hidden` and `weight`.
    pub fn dtype(&self) -> Dtype {
        self.hidden.dtype()
    }

    /// Checks the head's own shapes against `rows` targets: D ≥ 1, `hidden` N × D,
    /// `weight` V × D, `bias` V, one element type for `hidden` and `weight`. Returns
    /// (rows, classes).
    pub(crate) fn check(&self, rows: usize) -> Result<(usize, usize)> {
        let d = self.dim;
        if d == 0 {
            return Err(Error::InvalidOption("the hidden dimension must be at least 1".into()));
        }
        if !self.weight.len().is_multiple_of(d) || self.weight.is_empty() {
            return Err(Error::Shape {
                what: format!("weight (classes × hidden dim {d}, at least one class)"),
                got: self.weight.len(),
                expected: (self.weight.len() / d).max(1) * d,
            });
        }
        let v = self.weight.len() / d;
        let expected = rows.checked_mul(d).ok_or_else(|| Error::Shape {
            what: "hidden".into(),
            got: self.hidden.len(),
            expected: usize::MAX,
        })?;
        if self.hidden.len() != expected {
            return Err(Error::Shape {
                what: format!("hidden (rows {rows} of the targets × hidden dim {d} of the weight)"),
                got: self.hidden.len(),
                expected,
            });
        }
        if self.hidden.dtype() != self.weight.dtype() {
            return Err(Error::InvalidOption(format!(
                "hidden is {} but weight is {}: give both in one element type",
                self.hidden.dtype().name(),
                self.weight.dtype().name()
            )));
        }
        if let Some(b) = self.bias {
            if b.len() != v {
                return Err(Error::Shape {
                    what: format!("bias (one per class; the weight has {v} classes)"),
                    got: b.len(),
                    expected: v,
                });
            }
            if b.dtype() != Dtype::F32 && b.dtype() != self.hidden.dtype() {
                return Err(Error::InvalidOption(format!(
                    "bias is {} but hidden is {}: give the bias in f32 or in hidden's type",
                    b.dtype().name(),
                    self.hidden.dtype().name()
                )));
            }
        }
        Ok((rows, v))
    }
}

/// Where one gradient of the linear head goes.
#[derive(Debug, Default)]
pub enum GradientTo<'a> {
    /// Not computed.
    #[default]
    Skip,
    /// A new f32 vector in the [`LossOutput`](crate::LossOutput).
    Owned,
    /// Into the caller's f32 slice of the input's length.
    IntoF32(&'a mut [f32]),
    /// Into the caller's 16-bit slice in the input's half format, computed in f32 and
    /// rounded once (half-precision inputs only).
    IntoHalf(&'a mut [u16]),
}

impl GradientTo<'_> {
    /// Whether this gradient is computed.
    pub fn wanted(&self) -> bool {
        !matches!(self, GradientTo::Skip)
    }
}

/// The gradients of a linear head's loss, each computed only where asked: `dh` [rows,
/// dim], `dW` [classes, dim], `db` \[classes\].
#[derive(Debug, Default)]
pub struct HeadGradients<'a> {
    /// `dh = G W`.
    pub hidden: GradientTo<'a>,
    /// `dW = Gᵀ h`.
    pub weight: GradientTo<'a>,
    /// `db = Σ_rows G` (needs a bias in the head).
    pub bias: GradientTo<'a>,
}

impl HeadGradients<'_> {
    /// `dh` and `dW` owned, and `db` when the head has a bias.
    pub fn owned() -> Self {
        Self { hidden: GradientTo::Owned, weight: GradientTo::Owned, bias: GradientTo::Owned }
    }
    /// Whether any gradient is asked for.
    pub fn any(&self) -> bool {
        self.hidden.wanted() || self.weight.wanted() || self.bias.wanted()
    }
    /// The support matrix's output: into the half type if any goes there, else into f32
    /// if any does, else owned (or the loss only when none is asked).
    pub fn output(&self) -> Output {
        let all = [&self.hidden, &self.weight, &self.bias];
        if all.iter().any(|g| matches!(g, GradientTo::IntoHalf(_))) {
            Output::IntoHalf
        } else if all.iter().any(|g| matches!(g, GradientTo::IntoF32(_))) {
            Output::IntoF32
        } else if self.any() {
            Output::Owned
        } else {
            Output::Loss
        }
    }
}

/// A checked linear-head problem as the paths take it ([`Native::linear`](crate::front::Native::linear)):
/// the shapes agree, the targets are checked (with the whole batch's `mean`
/// denominators), every gradient destination is an f32 slice of its full length (the
/// front door allocates owned ones and rounds half ones once), and there is at least one
/// row.
pub(crate) struct LinearTask<'a> {
    /// The head.
    pub head: LinearHead<'a>,
    /// Rows N.
    pub rows: usize,
    /// Classes V.
    pub classes: usize,
    /// The checked targets and denominators.
    pub batch: crate::options::Batch,
    /// Fused, or a backward from the saved LSE (`Mode::Backward { lse: Some(..), .. }`)
    /// times the upstream gradient (a scalar, or one per row).
    pub mode: crate::problem::Mode<'a>,
    /// `dh` [rows, dim], overwritten.
    pub grad_hidden: Option<&'a mut [f32]>,
    /// `dW` [classes, dim], overwritten.
    pub grad_weight: Option<&'a mut [f32]>,
    /// `db` \[classes\], overwritten.
    pub grad_bias: Option<&'a mut [f32]>,
    /// Return the row losses (always for `none`).
    pub row_losses: bool,
    /// Return the per-row LSE.
    pub lse: bool,
}
