//! The front door: one [`Problem`] describes a loss evaluation — the logits as the
//! caller holds them, the labels, what to produce and how — and every path evaluates it
//! with one call, [`Backend::evaluate`](crate::Backend::evaluate). What the problem holds
//! picks the kernel, as in PyTorch: the logits' element type, the labels' kind, whether
//! the logits may be overwritten.
//!
//! ```
//! use xent::{Backend, Gradient, Labels, Logits, LossOptions, Problem, Reference};
//! let logits = [2.0f32, 0.5, -1.0, /* row 2 */ 0.0, 0.0, 0.0];
//! let targets = [0i64, 2];
//! let mut grad = [0.0f32; 6];
//! let problem = Problem::new(Logits::F32(&logits), 3, Labels::from(&targets))
//!     .gradient(Gradient::IntoF32(&mut grad));
//! let out = Reference.evaluate(problem, &LossOptions::new())?;
//! assert!((out.loss.unwrap() - 0.66996).abs() < 1e-4);
//! assert!(grad[0] < 0.0 && grad[3] > 0.0);
//! # Ok::<(), xent::Error>(())
//! ```
//!
//! The support matrix (README, "Library"): every [`Cell`] of
//! {f32, f16, bf16} × {class indices, probabilities, binary} ×
//! {loss, gradient owned / into f32 / into the input's type / in place, backward} works on
//! the GPU, the fast CPU path and the reference.

use crate::error::{Error, Result};
use crate::head::{GradientTo, HeadGradients, LinearHead, Values};
use crate::options::{HalfFormat, Targets, Upstream};

/// The logits as the caller holds them: read-only, or mutable so that the gradient can be
/// written over them ([`Gradient::InPlace`]). Half-precision logits are raw 16-bit values.
#[derive(Debug)]
pub enum Logits<'a> {
    /// f32 logits, read only.
    F32(&'a [f32]),
    /// f16 or bf16 logits as raw bits, read only.
    Half(&'a [u16], HalfFormat),
    /// f32 logits that may be overwritten by the gradient.
    F32Mut(&'a mut [f32]),
    /// f16 or bf16 logits that may be overwritten by the gradient (rounded once).
    HalfMut(&'a mut [u16], HalfFormat),
    /// The logits of a linear head, `h Wᵀ + b`, never stored whole (see
    /// [`Problem::linear`]).
    Linear(LinearHead<'a>),
}

/// A read-only view of plain logits, whatever their mutability.
pub type LogitsRef<'a> = Values<'a>;

impl<'a> Logits<'a> {
    /// Number of elements (rows × classes; for a linear head, of the logits it stands
    /// for).
    pub fn len(&self) -> usize {
        match self {
            Logits::Linear(head) => head.rows() * head.classes(),
            _ => self.view().map_or(0, |v| v.len()),
        }
    }
    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A read-only view of plain logits (`None` for a linear head, whose logits are
    /// never stored).
    pub fn view(&self) -> Option<LogitsRef<'_>> {
        match self {
            Logits::F32(l) => Some(LogitsRef::F32(l)),
            Logits::Half(l, f) => Some(LogitsRef::Half(l, *f)),
            Logits::F32Mut(l) => Some(LogitsRef::F32(l)),
            Logits::HalfMut(l, f) => Some(LogitsRef::Half(l, *f)),
            Logits::Linear(_) => None,
        }
    }
    /// The element type (of `h` and `W` for a linear head).
    pub fn dtype(&self) -> Dtype {
        match self {
            Logits::Linear(head) => head.dtype(),
            _ => self.view().map_or(Dtype::F32, |v| v.dtype()),
        }
    }
    /// Whether the gradient may be written over these logits.
    pub fn is_mut(&self) -> bool {
        matches!(self, Logits::F32Mut(_) | Logits::HalfMut(..))
    }
}

impl<'a> From<&'a [f32]> for Logits<'a> {
    fn from(l: &'a [f32]) -> Self {
        Logits::F32(l)
    }
}
impl<'a> From<&'a Vec<f32>> for Logits<'a> {
    fn from(l: &'a Vec<f32>) -> Self {
        Logits::F32(l)
    }
}
impl<'a> From<&'a mut [f32]> for Logits<'a> {
    fn from(l: &'a mut [f32]) -> Self {
        Logits::F32Mut(l)
    }
}
impl<'a> From<&'a mut Vec<f32>> for Logits<'a> {
    fn from(l: &'a mut Vec<f32>) -> Self {
        Logits::F32Mut(l)
    }
}

/// The logits' element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// f32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl Dtype {
    /// Every element type, for walking the support matrix.
    pub const ALL: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::Bf16];

    /// The type of a half format.
    pub fn of(format: HalfFormat) -> Dtype {
        match format {
            HalfFormat::F16 => Dtype::F16,
            HalfFormat::Bf16 => Dtype::Bf16,
        }
    }
    /// The half format, for F16 and Bf16.
    pub fn half(self) -> Option<HalfFormat> {
        match self {
            Dtype::F32 => None,
            Dtype::F16 => Some(HalfFormat::F16),
            Dtype::Bf16 => Some(HalfFormat::Bf16),
        }
    }
    /// The name, as NumPy and PyTorch write it.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "float32",
            Dtype::F16 => "float16",
            Dtype::Bf16 => "bfloat16",
        }
    }
}

/// What the loss compares the logits with.
#[derive(Clone, Copy, Debug)]
pub enum Labels<'a> {
    /// One class index per row (`ignore_index` applies).
    Classes(Targets<'a>),
    /// Probabilities [rows, classes] (PyTorch's float targets of `cross_entropy`).
    Probabilities(&'a [f32]),
    /// Binary (multilabel) targets [rows, classes]: binary cross-entropy with logits.
    Binary(&'a [f32]),
}

impl<'a> Labels<'a> {
    /// The kind, for the support matrix.
    pub fn kind(&self) -> LabelKind {
        match self {
            Labels::Classes(_) => LabelKind::Classes,
            Labels::Probabilities(_) => LabelKind::Probabilities,
            Labels::Binary(_) => LabelKind::Binary,
        }
    }
}

impl<'a, T> From<T> for Labels<'a>
where
    T: Into<Targets<'a>>,
{
    fn from(t: T) -> Self {
        Labels::Classes(t.into())
    }
}

/// The kind of [`Labels`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LabelKind {
    /// Class indices.
    Classes,
    /// Probability targets.
    Probabilities,
    /// Binary targets (binary cross-entropy).
    Binary,
}

impl LabelKind {
    /// Every kind, for walking the support matrix.
    pub const ALL: [LabelKind; 3] = [LabelKind::Classes, LabelKind::Probabilities, LabelKind::Binary];

    fn name(self) -> &'static str {
        match self {
            LabelKind::Classes => "class indices",
            LabelKind::Probabilities => "probability targets",
            LabelKind::Binary => "binary targets",
        }
    }
}

/// Where the gradient d(loss)/d(logits) goes.
#[derive(Debug, Default)]
pub enum Gradient<'a> {
    /// No gradient: the loss only.
    #[default]
    None,
    /// A new f32 vector, in [`LossOutput::gradient`](crate::LossOutput::gradient).
    Owned,
    /// Into the caller's f32 slice (the logits' length): a memory map, say.
    IntoF32(&'a mut [f32]),
    /// Into the caller's 16-bit slice in the logits' own half format, each value computed
    /// in f32 and rounded once (half-precision logits only).
    IntoHalf(&'a mut [u16]),
    /// Over the logits, in their own type (needs [`Logits::F32Mut`] or
    /// [`Logits::HalfMut`]).
    InPlace,
    /// The gradients of a linear head ([`Logits::Linear`]): `dh`, `dW`, `db`, each where
    /// asked. ([`Gradient::Owned`] with a linear head means all of them owned.)
    Linear(HeadGradients<'a>),
}

/// How the problem is evaluated.
#[derive(Clone, Copy, Debug, Default)]
pub enum Mode<'a> {
    /// The loss (and the gradient, if asked) in one fused pass.
    #[default]
    Fused,
    /// A separate backward: only the gradient, times `upstream` (the gradient of an outer
    /// loss with respect to this one). Cross-entropy needs the per-row LSE a forward
    /// saved ([`Problem::lse`]); binary cross-entropy takes `lse: None` and recomputes
    /// from the logits.
    Backward {
        /// The saved per-row log-sum-exp (cross-entropy), or `None` (binary).
        lse: Option<&'a [f32]>,
        /// The upstream gradient: a scalar, one per row (cross-entropy under `none`),
        /// or one per element (binary cross-entropy under `none`).
        upstream: Upstream<'a>,
    },
}

/// One loss evaluation, as every path takes it. Build with [`Problem::new`] and the
/// setters; options of the loss itself (reduction, weights, smoothing, ...) are the
/// [`LossOptions`](crate::LossOptions) passed beside it.
#[derive(Debug)]
pub struct Problem<'a> {
    /// The logits [rows, classes], row major.
    pub logits: Logits<'a>,
    /// Number of classes V.
    pub classes: usize,
    /// The labels.
    pub labels: Labels<'a>,
    /// Where the gradient goes.
    pub gradient: Gradient<'a>,
    /// Fused, or a separate backward.
    pub mode: Mode<'a>,
    /// Also return the per-row losses for `sum` and `mean` (always for `none`).
    pub row_losses: bool,
    /// Also return each row's log-sum-exp (cross-entropy only).
    pub lse: bool,
}

impl<'a> Problem<'a> {
    /// The loss of `logits` ([rows, classes]) against `labels`, fused, no gradient.
    pub fn new(logits: impl Into<Logits<'a>>, classes: usize, labels: impl Into<Labels<'a>>) -> Self {
        Self {
            logits: logits.into(),
            classes,
            labels: labels.into(),
            gradient: Gradient::None,
            mode: Mode::Fused,
            row_losses: false,
            lse: false,
        }
    }
    /// Where the gradient goes.
    pub fn gradient(mut self, gradient: Gradient<'a>) -> Self {
        self.gradient = gradient;
        self
    }
    /// Also return the per-row losses.
    pub fn row_losses(mut self, yes: bool) -> Self {
        self.row_losses = yes;
        self
    }
    /// Also return the per-row log-sum-exp.
    pub fn lse(mut self, yes: bool) -> Self {
        self.lse = yes;
        self
    }
    /// A separate backward from the LSE a forward saved (cross-entropy) — give `None`
    /// for binary cross-entropy — times `upstream`. The gradient defaults to
    /// [`Gradient::Owned`] when none was asked for.
    pub fn backward(mut self, lse: Option<&'a [f32]>, upstream: Upstream<'a>) -> Self {
        self.mode = Mode::Backward { lse, upstream };
        if matches!(self.gradient, Gradient::None) {
            self.gradient = Gradient::Owned;
        }
        self
    }
    /// The loss of the linear head `h Wᵀ + b` against class indices, its logits never
    /// stored: fused, no gradient ([`Gradient::Linear`] or [`Gradient::Owned`] asks for
    /// `dh`, `dW`, `db`).
    pub fn linear(head: LinearHead<'a>, targets: impl Into<Targets<'a>>) -> Self {
        Self::new(Logits::Linear(head), head.classes(), Labels::Classes(targets.into()))
    }
    /// The coordinates of this problem in the support matrix.
    pub fn cell(&self) -> Cell {
        Cell {
            input: if matches!(self.logits, Logits::Linear(_)) { Input::Linear } else { Input::Logits },
            dtype: self.logits.dtype(),
            labels: self.labels.kind(),
            output: match (&self.mode, &self.gradient) {
                (Mode::Backward { .. }, _) => Output::Backward,
                (_, Gradient::None) => Output::Loss,
                (_, Gradient::Owned) => Output::Owned,
                (_, Gradient::IntoF32(_)) => Output::IntoF32,
                (_, Gradient::IntoHalf(_)) => Output::IntoHalf,
                (_, Gradient::InPlace) => Output::InPlace,
                (_, Gradient::Linear(g)) => g.output(),
            },
        }
    }
    /// Number of rows, from the labels (class indices) or the logits.
    pub fn rows(&self) -> usize {
        match self.labels {
            Labels::Classes(t) => t.len(),
            _ => self.logits.len() / self.classes.max(1),
        }
    }
}

/// What a problem produces, for the support matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// The loss only.
    Loss,
    /// The loss and an owned f32 gradient.
    Owned,
    /// The loss and the gradient into an f32 slice.
    IntoF32,
    /// The loss and the gradient into a slice of the logits' half type.
    IntoHalf,
    /// The loss and the gradient over the logits.
    InPlace,
    /// A separate backward.
    Backward,
}

impl Output {
    /// Every output, for walking the support matrix.
    pub const ALL: [Output; 6] =
        [Output::Loss, Output::Owned, Output::IntoF32, Output::IntoHalf, Output::InPlace, Output::Backward];

    fn name(self) -> &'static str {
        match self {
            Output::Loss => "loss only",
            Output::Owned => "gradient owned",
            Output::IntoF32 => "gradient into f32",
            Output::IntoHalf => "gradient into the input's type",
            Output::InPlace => "gradient in place",
            Output::Backward => "backward",
        }
    }
}

/// What the loss is computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// Logits [rows, classes].
    Logits,
    /// A linear head `h Wᵀ + b` ([`Logits::Linear`]).
    Linear,
}

/// A cell of the support matrix: input × element type × labels × output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cell {
    /// Logits, or a linear head.
    pub input: Input,
    /// The logits' element type.
    pub dtype: Dtype,
    /// The labels' kind.
    pub labels: LabelKind,
    /// What is produced.
    pub output: Output,
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.input {
            Input::Logits => {
                write!(f, "{} logits × {} × {}", self.dtype.name(), self.labels.name(), self.output.name())
            }
            Input::Linear => write!(
                f,
                "linear head of {} h and W × {} × {}",
                self.dtype.name(),
                self.labels.name(),
                self.output.name()
            ),
        }
    }
}

impl Cell {
    /// Every cell that makes sense: [`Output::IntoHalf`] needs half-precision logits.
    pub fn all() -> Vec<Cell> {
        let mut cells = Vec::new();
        for dtype in Dtype::ALL {
            for labels in LabelKind::ALL {
                for output in Output::ALL {
                    if output == Output::IntoHalf && dtype == Dtype::F32 {
                        continue;
                    }
                    cells.push(Cell { input: Input::Logits, dtype, labels, output });
                }
            }
        }
        cells
    }

    /// Every cell of the linear head: {f32, f16, bf16} `h` and `W` × class indices ×
    /// {loss, gradients owned / into f32 / into the input's type, backward}.
    pub fn linear() -> Vec<Cell> {
        let mut cells = Vec::new();
        for dtype in Dtype::ALL {
            for output in [Output::Loss, Output::Owned, Output::IntoF32, Output::IntoHalf, Output::Backward] {
                if output == Output::IntoHalf && dtype == Dtype::F32 {
                    continue;
                }
                cells.push(Cell { input: Input::Linear, dtype, labels: LabelKind::Classes, output });
            }
        }
        cells
    }
}

/// The checks every path runs on a problem's shape before any work: the logits' length,
/// the labels', the gradient destination's, in-place needs mutable logits, a half
/// destination needs half logits, a backward's LSE and upstream.
pub(crate) fn check_shape(p: &Problem<'_>) -> Result<usize> {
    let v = p.classes;
    if v == 0 {
        return Err(Error::InvalidOption("classes must be at least 1".into()));
    }
    if let Logits::Linear(head) = &p.logits {
        check_head(p, head)?;
    } else if matches!(p.gradient, Gradient::Linear(_)) {
        return Err(Error::InvalidOption(
            "Gradient::Linear is for a linear head (Logits::Linear); use Gradient::IntoF32 or InPlace".into(),
        ));
    }
    let n = p.logits.len();
    let rows = match p.labels {
        Labels::Classes(t) => {
            let rows = t.len();
            let expected = rows.checked_mul(v).ok_or_else(|| Error::Shape {
                what: "logits".into(),
                got: n,
                expected: usize::MAX,
            })?;
            if n != expected {
                return Err(Error::Shape {
                    what: format!("logits (rows {rows} × classes {v})"),
                    got: n,
                    expected,
                });
            }
            rows
        }
        Labels::Probabilities(t) | Labels::Binary(t) => {
            if !n.is_multiple_of(v) {
                return Err(Error::Shape {
                    what: format!("logits (a whole number of rows of {v} classes)"),
                    got: n,
                    expected: n / v * v,
                });
            }
            if t.len() != n {
                let what = match p.labels.kind() {
                    LabelKind::Binary => "binary targets (one per logit)",
                    _ => "probability targets (one per logit)",
                };
                return Err(Error::Shape { what: what.into(), got: t.len(), expected: n });
            }
            n / v
        }
    };
    match &p.gradient {
        Gradient::IntoF32(g) if g.len() != n => {
            return Err(Error::Shape { what: "gradient output".into(), got: g.len(), expected: n });
        }
        Gradient::IntoHalf(g) if g.len() != n => {
            return Err(Error::Shape { what: "gradient output".into(), got: g.len(), expected: n });
        }
        Gradient::IntoHalf(_) if p.logits.dtype() == Dtype::F32 => {
            return Err(Error::InvalidOption(
                "a gradient in the input's half type needs half-precision logits; use Gradient::IntoF32"
                    .into(),
            ));
        }
        Gradient::InPlace if !p.logits.is_mut() => {
            return Err(Error::InvalidOption(
                "a gradient in place needs mutable logits (Logits::F32Mut or Logits::HalfMut)".into(),
            ));
        }
        _ => {}
    }
    if let Mode::Backward { lse, upstream } = p.mode {
        if matches!(p.gradient, Gradient::None) {
            return Err(Error::InvalidOption("a backward produces a gradient: say where it goes".into()));
        }
        match (p.labels.kind(), lse) {
            (LabelKind::Binary, Some(_)) => {
                return Err(Error::InvalidOption(
                    "binary cross-entropy's backward takes no saved LSE (it recomputes from the logits)"
                        .into(),
                ));
            }
            (LabelKind::Binary, None) => {}
            (_, None) => {
                return Err(Error::InvalidOption(
                    "a cross-entropy backward needs the per-row LSE its forward saved".into(),
                ));
            }
            (_, Some(l)) if l.len() != rows => {
                return Err(Error::Shape {
                    what: "saved LSE (one per row)".into(),
                    got: l.len(),
                    expected: rows,
                });
            }
            _ => {}
        }
        match (upstream, p.labels.kind()) {
            (Upstream::Scalar(_), _) => {}
            (Upstream::PerRow(g), LabelKind::Classes | LabelKind::Probabilities) if g.len() != rows => {
                return Err(Error::Shape {
                    what: "upstream gradient (one per row)".into(),
                    got: g.len(),
                    expected: rows,
                });
            }
            (Upstream::PerRow(_), LabelKind::Classes | LabelKind::Probabilities) => {}
            (Upstream::PerElement(g), LabelKind::Binary) if g.len() != n => {
                return Err(Error::Shape {
                    what: "upstream gradient (one per element)".into(),
                    got: g.len(),
                    expected: n,
                });
            }
            (Upstream::PerElement(_), LabelKind::Binary) => {}
            (Upstream::PerRow(_), LabelKind::Binary) => {
                return Err(Error::InvalidOption(
                    "binary cross-entropy's losses are per element: give Upstream::PerElement".into(),
                ));
            }
            (Upstream::PerElement(_), _) => {
                return Err(Error::InvalidOption(
                    "cross-entropy's losses are per row: give Upstream::PerRow".into(),
                ));
            }
        }
    }
    Ok(rows)
}

/// The linear head's own checks: class-index targets, the head's shapes, the gradients'
/// destinations (lengths, a half destination needs half inputs, `db` needs a bias), and
/// no gradient over the logits (there are none).
fn check_head(p: &Problem<'_>, head: &LinearHead<'_>) -> Result<()> {
    let Labels::Classes(t) = p.labels else {
        return Err(Error::InvalidOption(format!(
            "the linear head takes class-index targets, not {}",
            p.labels.kind().name()
        )));
    };
    let (rows, v) = head.check(t.len())?;
    if p.classes != v {
        return Err(Error::Shape { what: "classes (the weight's rows)".into(), got: p.classes, expected: v });
    }
    let grads = match &p.gradient {
        Gradient::None | Gradient::Owned => return Ok(()),
        Gradient::Linear(g) => g,
        _ => {
            return Err(Error::InvalidOption(
                "a linear head has no logits to write a gradient over or into: give Gradient::Linear \
                 (dh, dW, db) or Gradient::Owned"
                    .into(),
            ));
        }
    };
    let half = head.dtype() != Dtype::F32;
    for (what, dest, len) in [
        ("gradient of hidden", &grads.hidden, rows * head.dim),
        ("gradient of weight", &grads.weight, v * head.dim),
        ("gradient of bias", &grads.bias, v),
    ] {
        let got = match dest {
            GradientTo::Skip | GradientTo::Owned => None,
            GradientTo::IntoF32(g) => Some(g.len()),
            GradientTo::IntoHalf(g) => Some(g.len()),
        };
        if got.is_some_and(|g| g != len) {
            return Err(Error::Shape { what: what.into(), got: got.unwrap_or(0), expected: len });
        }
        if matches!(dest, GradientTo::IntoHalf(_)) && !half {
            return Err(Error::InvalidOption(format!(
                "a {what} in the input's half type needs half-precision h and W; use GradientTo::IntoF32"
            )));
        }
    }
    if head.bias.is_none() && matches!(grads.bias, GradientTo::IntoF32(_) | GradientTo::IntoHalf(_)) {
        return Err(Error::InvalidOption("a gradient of the bias needs a bias in the head".into()));
    }
    Ok(())
}
