//! The vocabulary shared by every path: loss options, targets, results, and the input
//! checks that run before any work is done.

use crate::error::{Error, Result};
use crate::metrics::{Metrics, MetricsSpec};

/// How per-row losses are combined into the result (PyTorch's `reduction`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// Keep one loss per row; [`LossOutput::loss`] is `None`.
    None,
    /// Sum of the row losses (0 for an empty batch).
    Sum,
    /// Sum divided by the number of non-ignored rows (NaN when there are none).
    #[default]
    Mean,
}

impl Reduction {
    /// The name used on the command line: `none`, `sum` or `mean`.
    pub fn name(self) -> &'static str {
        match self {
            Reduction::None => "none",
            Reduction::Sum => "sum",
            Reduction::Mean => "mean",
        }
    }
}

impl std::str::FromStr for Reduction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Reduction::None),
            "sum" => Ok(Reduction::Sum),
            "mean" => Ok(Reduction::Mean),
            other => Err(Error::InvalidOption(format!(
                "unknown reduction '{other}', expected one of none, sum, mean"
            ))),
        }
    }
}

/// PyTorch's default `ignore_index`.
pub const DEFAULT_IGNORE_INDEX: i64 = -100;

/// Options of a cross-entropy evaluation. Build with [`LossOptions::new`] and the setters.
///
/// ```
/// use xent::{LossOptions, Reduction};
/// let opts = LossOptions::new().reduction(Reduction::Sum).ignore_index(0).label_smoothing(0.1);
/// assert_eq!(opts.get_reduction(), Reduction::Sum);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct LossOptions {
    reduction: Reduction,
    ignore_index: i64,
    gradient: bool,
    row_losses: bool,
    lse: bool,
    weights: Option<Vec<f32>>,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
    logit_scale: f64,
    n_items: Option<f64>,
    pos_weight: Option<Vec<f32>>,
    metrics: Option<MetricsSpec>,
    /// The `mean` denominators (cross-entropy part, z-loss part) of a whole batch, set by
    /// the front door when it evaluates the batch in row blocks (not validated: they may
    /// be 0 or negative, as sums of class weights may).
    pub(crate) denominators: Option<(f64, f64)>,
}

impl Default for LossOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl LossOptions {
    /// Mean reduction, `ignore_index` −100, no gradient: PyTorch's defaults.
    pub fn new() -> Self {
        Self {
            reduction: Reduction::Mean,
            ignore_index: DEFAULT_IGNORE_INDEX,
            gradient: false,
            row_losses: false,
            lse: false,
            weights: None,
            label_smoothing: 0.0,
            z_loss: 0.0,
            softcap: None,
            logit_scale: 1.0,
            n_items: None,
            pos_weight: None,
            metrics: None,
            denominators: None,
        }
    }
    /// Positive-class weights, one per class, for binary cross-entropy (PyTorch's
    /// `pos_weight`).
    pub fn pos_weight(mut self, pos_weight: Vec<f32>) -> Self {
        self.pos_weight = Some(pos_weight);
        self
    }
    /// Computes evaluation metrics beside the loss, in the same pass
    /// ([`LossOutput::metrics`]): accuracy, top-k accuracies, nll, perplexity, entropy and
    /// the ECE (class-index and probability targets, fused evaluations).
    pub fn metrics(mut self, spec: MetricsSpec) -> Self {
        self.metrics = Some(spec);
        self
    }
    /// The metrics asked for.
    pub fn get_metrics(&self) -> Option<&MetricsSpec> {
        self.metrics.as_ref()
    }
    /// The positive-class weights.
    pub fn get_pos_weight(&self) -> Option<&[f32]> {
        self.pos_weight.as_deref()
    }
    /// Class weights, one per class (PyTorch's `weight`): row losses are weighted by
    /// their target's weight, and `mean` divides by the sum of the counted rows' weights.
    pub fn weights(mut self, weights: Vec<f32>) -> Self {
        self.weights = Some(weights);
        self
    }
    /// Label smoothing ε in [0, 1] (PyTorch's `label_smoothing`).
    pub fn label_smoothing(mut self, epsilon: f64) -> Self {
        self.label_smoothing = epsilon;
        self
    }
    /// z-loss scale s ≥ 0: each counted row adds `s · lse²` (PaLM).
    pub fn z_loss(mut self, scale: f64) -> Self {
        self.z_loss = scale;
        self
    }
    /// Logit softcap c > 0: the loss sees `c · tanh(x / c)` (Gemma 2).
    pub fn softcap(mut self, cap: f64) -> Self {
        self.softcap = Some(cap);
        self
    }
    /// Multiplies the logits by `scale` before anything else (a temperature of 1/scale).
    pub fn logit_scale(mut self, scale: f64) -> Self {
        self.logit_scale = scale;
        self
    }
    /// A caller-given normaliser that replaces the `mean` denominator, so that gradient
    /// accumulation over micro-batches matches one big batch.
    pub fn n_items(mut self, n: f64) -> Self {
        self.n_items = Some(n);
        self
    }
    /// The class weights.
    pub fn get_weights(&self) -> Option<&[f32]> {
        self.weights.as_deref()
    }
    /// Label smoothing ε.
    pub fn get_label_smoothing(&self) -> f64 {
        self.label_smoothing
    }
    /// z-loss scale.
    pub fn get_z_loss(&self) -> f64 {
        self.z_loss
    }
    /// Logit softcap.
    pub fn get_softcap(&self) -> Option<f64> {
        self.softcap
    }
    /// Logit scale.
    pub fn get_logit_scale(&self) -> f64 {
        self.logit_scale
    }
    /// The caller-given `mean` denominator.
    pub fn get_n_items(&self) -> Option<f64> {
        self.n_items
    }
    /// The `mean` denominator in force for probability and binary targets, whose
    /// natural one (`natural`: N, or N·V) is replaced by `n_items`.
    pub(crate) fn mean_denominator(&self, natural: f64) -> f64 {
        self.denominators.map(|d| d.0).or(self.n_items).unwrap_or(natural)
    }
    /// True when only PyTorch's plain options are in use (no weights, smoothing, z-loss,
    /// softcap, scale or normaliser).
    pub fn is_plain(&self) -> bool {
        self.weights.is_none()
            && self.label_smoothing == 0.0
            && self.z_loss == 0.0
            && self.softcap.is_none()
            && self.logit_scale == 1.0
            && self.n_items.is_none()
    }

    /// Checks every option against the number of classes.
    pub fn validate(&self, classes: usize) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidOption(m));
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return bad(format!("label smoothing must be in [0, 1], got {}", self.label_smoothing));
        }
        if !(self.z_loss.is_finite() && self.z_loss >= 0.0) {
            return bad(format!("z-loss scale must be finite and >= 0, got {}", self.z_loss));
        }
        if let Some(c) = self.softcap
            && !(c.is_finite() && c > 0.0)
        {
            return bad(format!("softcap must be finite and > 0, got {c}"));
        }
        if !(self.logit_scale.is_finite() && self.logit_scale != 0.0) {
            return bad(format!("logit scale must be finite and non-zero, got {}", self.logit_scale));
        }
        if let Some(n) = self.n_items
            && !(n.is_finite() && n > 0.0)
        {
            return bad(format!("n_items must be finite and > 0, got {n}"));
        }
        if let Some(w) = &self.weights {
            check_class_vector("weights", w, classes)?;
        }
        if let Some(w) = &self.pos_weight {
            check_class_vector("pos_weight", w, classes)?;
        }
        if let Some(m) = &self.metrics {
            m.validate()?;
        }
        Ok(())
    }

    /// Checks the options of a binary cross-entropy: only `weights`, `pos_weight`, the
    /// reduction and `n_items` apply there.
    pub fn validate_binary(&self, classes: usize) -> Result<()> {
        self.validate(classes)?;
        let extra = [
            ("label smoothing", self.label_smoothing != 0.0),
            ("z-loss", self.z_loss != 0.0),
            ("softcap", self.softcap.is_some()),
            ("logit scale", self.logit_scale != 1.0),
            ("ignore_index", self.ignore_index != DEFAULT_IGNORE_INDEX),
            ("metrics (accuracy and the rest need one class per row)", self.metrics.is_some()),
        ];
        match extra.iter().find(|(_, set)| *set) {
            Some((name, _)) => {
                Err(Error::InvalidOption(format!("{name} does not apply to binary cross-entropy")))
            }
            None => Ok(()),
        }
    }
    /// Sets the reduction.
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }
    /// Sets the target value whose rows are ignored (loss 0, gradient 0). Any integer,
    /// also a valid class id.
    pub fn ignore_index(mut self, ignore_index: i64) -> Self {
        self.ignore_index = ignore_index;
        self
    }
    /// Asks the paths' own functions for the gradient (the front door sets it from
    /// [`crate::Problem::gradient`]).
    pub(crate) fn gradient(mut self, yes: bool) -> Self {
        self.gradient = yes;
        self
    }
    /// Asks the paths' own functions for the per-row losses (from
    /// [`crate::Problem::row_losses`]).
    pub(crate) fn row_losses(mut self, yes: bool) -> Self {
        self.row_losses = yes;
        self
    }
    /// Asks the paths' own functions for the per-row LSE (from [`crate::Problem::lse`]).
    pub(crate) fn lse(mut self, yes: bool) -> Self {
        self.lse = yes;
        self
    }
    /// The reduction.
    pub fn get_reduction(&self) -> Reduction {
        self.reduction
    }
    /// The ignore index.
    pub fn get_ignore_index(&self) -> i64 {
        self.ignore_index
    }
    /// Whether a separate gradient is asked for.
    pub(crate) fn wants_gradient(&self) -> bool {
        self.gradient
    }
    /// Whether per-row losses are returned (always for [`Reduction::None`]).
    pub(crate) fn wants_row_losses(&self) -> bool {
        self.row_losses || self.reduction == Reduction::None
    }
    /// Whether per-row log-sum-exp values are returned.
    pub(crate) fn wants_lse(&self) -> bool {
        self.lse
    }
}

/// Checks a per-class vector (class weights, pos_weight): one finite value per class.
/// Negative and zero values are taken as given, as PyTorch does.
pub fn check_class_vector(what: &str, values: &[f32], classes: usize) -> Result<()> {
    if values.len() != classes {
        return Err(Error::Shape {
            what: format!("{what} (one per class; there are {classes} classes)"),
            got: values.len(),
            expected: classes,
        });
    }
    if let Some((i, w)) = values.iter().enumerate().find(|(_, w)| !w.is_finite()) {
        return Err(Error::InvalidOption(format!("{what}[{i}] is {w}: every value must be finite")));
    }
    Ok(())
}

/// Class-index targets, one per row, borrowed from the caller.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// 64-bit class indices (PyTorch's `long`).
    I64(&'a [i64]),
    /// 32-bit class indices.
    I32(&'a [i32]),
}

impl Targets<'_> {
    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            Targets::I64(t) => t.len(),
            Targets::I32(t) => t.len(),
        }
    }
    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The target of `row` as i64.
    pub fn get(&self, row: usize) -> i64 {
        match self {
            Targets::I64(t) => t[row],
            Targets::I32(t) => i64::from(t[row]),
        }
    }
}

impl<'a> From<&'a [i64]> for Targets<'a> {
    fn from(t: &'a [i64]) -> Self {
        Targets::I64(t)
    }
}
impl<'a> From<&'a [i32]> for Targets<'a> {
    fn from(t: &'a [i32]) -> Self {
        Targets::I32(t)
    }
}
impl<'a> From<&'a Vec<i64>> for Targets<'a> {
    fn from(t: &'a Vec<i64>) -> Self {
        Targets::I64(t)
    }
}
impl<'a> From<&'a Vec<i32>> for Targets<'a> {
    fn from(t: &'a Vec<i32>) -> Self {
        Targets::I32(t)
    }
}
impl<'a, const N: usize> From<&'a [i64; N]> for Targets<'a> {
    fn from(t: &'a [i64; N]) -> Self {
        Targets::I64(t)
    }
}

/// Checks a binary cross-entropy problem: logits and targets both [rows, classes], and
/// the options that apply. Returns the number of rows.
pub fn check_binary(logits: usize, targets: usize, classes: usize, opts: &LossOptions) -> Result<usize> {
    let rows = check_dense(logits, targets, classes, "binary targets (one per logit)")?;
    opts.validate_binary(classes)?;
    Ok(rows)
}

/// Logits and dense targets, both [rows, classes]: returns the rows.
fn check_dense(logits: usize, targets: usize, classes: usize, what: &str) -> Result<usize> {
    if classes == 0 {
        return Err(Error::InvalidOption("classes must be at least 1".into()));
    }
    if !logits.is_multiple_of(classes) {
        return Err(Error::Shape {
            what: format!("logits (a whole number of rows of {classes} classes)"),
            got: logits,
            expected: logits / classes * classes,
        });
    }
    if targets != logits {
        return Err(Error::Shape { what: what.into(), got: targets, expected: logits });
    }
    Ok(logits / classes)
}

/// Checks a cross-entropy with probability (soft) targets: logits and targets both
/// [rows, classes], and the options. Returns the `mean` denominator (N, or `n_items`)
/// and the number of rows.
pub fn check_soft(logits: usize, targets: usize, classes: usize, opts: &LossOptions) -> Result<(f64, usize)> {
    let rows = check_dense(logits, targets, classes, "probability targets (one per logit)")?;
    opts.validate(classes)?;
    if opts.get_pos_weight().is_some() {
        return Err(Error::InvalidOption("pos_weight applies to binary cross-entropy only".into()));
    }
    Ok((opts.mean_denominator(rows as f64), rows))
}

/// A 16-bit floating-point format of logits held as raw `u16` bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HalfFormat {
    /// IEEE binary16 (`torch.float16`, NumPy `float16`).
    F16,
    /// bfloat16 (`torch.bfloat16`): the high 16 bits of an f32.
    Bf16,
}

impl HalfFormat {
    /// The f32 value of `bits`.
    pub fn to_f32(self, bits: u16) -> f32 {
        match self {
            HalfFormat::Bf16 => f32::from_bits(u32::from(bits) << 16),
            HalfFormat::F16 => f16_to_f32(bits),
        }
    }

    /// `x` rounded to the nearest value of the format (ties to even).
    pub fn from_f32(self, x: f32) -> u16 {
        match self {
            HalfFormat::Bf16 => {
                let u = x.to_bits();
                if x.is_nan() {
                    return ((u >> 16) | 0x40) as u16;
                }
                ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
            }
            HalfFormat::F16 => f32_to_f16(x),
        }
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let mant = u32::from(h & 0x3ff);
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: m · 2^-24.
            return f32::from_bits(sign)
                + (if sign != 0 { -1.0 } else { 1.0 }) * m as f32 * (1.0 / 16_777_216.0);
        }
        (31, 0) => sign | 0x7f80_0000,
        (31, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

fn f32_to_f16(x: f32) -> u16 {
    let u = x.to_bits();
    let sign = ((u >> 16) & 0x8000) as u16;
    let a = x.abs();
    if x.is_nan() {
        return sign | 0x7e00;
    }
    if a >= 65520.0 {
        return sign | 0x7c00; // rounds to infinity
    }
    if a < 6.103_515_6e-5 {
        // Subnormal (or zero): a multiple of 2^-24, rounded to nearest even.
        let m = (a * 16_777_216.0).round_ties_even() as u16;
        return sign | m;
    }
    let exp = ((u >> 23) & 0xff) as i32 - 127 + 15;
    let mant = u & 0x7f_ffff;
    let mut h = ((exp as u32) << 10) | (mant >> 13);
    let rest = mant & 0x1fff;
    if rest > 0x1000 || (rest == 0x1000 && (h & 1) == 1) {
        h += 1;
    }
    sign | h as u16
}

/// The upstream gradient of a separate backward: d(outer loss)/d(this loss).
#[derive(Clone, Copy, Debug)]
pub enum Upstream<'a> {
    /// One value for the reduced loss (or for every row).
    Scalar(f32),
    /// One value per row (for `Reduction::None`).
    PerRow(&'a [f32]),
    /// One value per element (binary cross-entropy under `Reduction::None`).
    PerElement(&'a [f32]),
}

impl<'a> Upstream<'a> {
    /// The upstream gradient of row `r` (of element `r` for [`Upstream::PerElement`]).
    pub fn of_row(&self, r: usize) -> f32 {
        match self {
            Upstream::Scalar(g) => *g,
            Upstream::PerRow(g) | Upstream::PerElement(g) => g[r],
        }
    }

    /// The part of a per-row (per-element) upstream gradient for rows (elements) `range`.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Upstream<'a> {
        match *self {
            Upstream::Scalar(g) => Upstream::Scalar(g),
            Upstream::PerRow(g) => Upstream::PerRow(&g[range]),
            Upstream::PerElement(g) => Upstream::PerElement(&g[range]),
        }
    }

    /// Checks the per-row length against the rows.
    pub fn check(&self, rows: usize) -> Result<()> {
        if let Upstream::PerRow(g) = self
            && g.len() != rows
        {
            return Err(Error::Shape {
                what: "upstream gradient (one per row)".into(),
                got: g.len(),
                expected: rows,
            });
        }
        Ok(())
    }
}

/// What a loss evaluation returns. Every path (GPU, CPU fast, CPU reference) fills the
/// same fields for the same options.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LossOutput {
    /// The reduced loss; `None` for [`Reduction::None`].
    pub loss: Option<f32>,
    /// Per-row losses (ignored rows: 0), for `none` or when asked.
    pub row_losses: Option<Vec<f32>>,
    /// Per-row log-sum-exp, when asked.
    pub lse: Option<Vec<f32>>,
    /// The gradient d(loss)/d(logits), row major [rows, classes], for
    /// [`Gradient::Owned`](crate::Gradient::Owned) (other destinations hold it themselves).
    pub gradient: Option<Vec<f32>>,
    /// The z-loss part of [`loss`](Self::loss) on its own (`s · Σ lse²` over the counted
    /// rows, divided under `mean` by their number, or by `n_items`), when z-loss is on
    /// and the loss is reduced (Liger's `return_z_loss`).
    pub z_loss: Option<f32>,
    /// A linear head's `dh` [rows, dim], when asked for as
    /// [`GradientTo::Owned`](crate::GradientTo::Owned).
    pub grad_hidden: Option<Vec<f32>>,
    /// A linear head's `dW` [classes, dim], when owned.
    pub grad_weight: Option<Vec<f32>>,
    /// A linear head's `db` \[classes\], when owned.
    pub grad_bias: Option<Vec<f32>>,
    /// The evaluation metrics, when asked for ([`LossOptions::metrics`]).
    pub metrics: Option<Metrics>,
}

/// A checked problem: the shape, the targets made ready for the kernels, and the
/// `mean` denominator. Built by [`Batch::new`], which is where every path's input
/// checks live.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Number of rows N.
    pub rows: usize,
    /// Number of classes V.
    pub classes: usize,
    /// Targets as i32, with every ignored row set to [`Batch::IGNORED`].
    pub targets: Vec<i32>,
    /// Number of rows that are not ignored.
    pub counted_rows: usize,
    /// Σ over counted rows of their target's class weight (= `counted_rows` without
    /// weights): PyTorch's `mean` denominator.
    pub weighted_count: f64,
    /// The `mean` denominator in force: `n_items` when given, else `weighted_count`.
    pub mean_denominator: f64,
    /// The `mean` denominator of the z-loss part: `n_items` when given, else
    /// `counted_rows` (Liger's convention; the cross-entropy part keeps `Σ w_y`).
    pub z_denominator: f64,
}

impl Batch {
    /// The target value that marks an ignored row in [`Batch::targets`].
    pub const IGNORED: i32 = -1;

    /// Checks `logits_len` against `rows × classes` and every target against the range,
    /// before any work is dispatched.
    pub fn new(logits_len: usize, classes: usize, targets: Targets<'_>, opts: &LossOptions) -> Result<Self> {
        let rows = targets.len();
        if classes == 0 {
            return Err(Error::InvalidOption("classes must be at least 1".into()));
        }
        let expected = rows.checked_mul(classes).ok_or_else(|| Error::Shape {
            what: "logits".into(),
            got: logits_len,
            expected: usize::MAX,
        })?;
        if logits_len != expected {
            return Err(Error::Shape {
                what: format!("logits (rows {rows} × classes {classes})"),
                got: logits_len,
                expected,
            });
        }
        opts.validate(classes)?;
        if opts.get_pos_weight().is_some() {
            return Err(Error::InvalidOption("pos_weight applies to binary cross-entropy only".into()));
        }
        if classes > i32::MAX as usize {
            return Err(Error::InvalidOption(format!(
                "{classes} classes is more than the kernels' i32 class index can address"
            )));
        }
        let ignore = opts.get_ignore_index();
        let mut out = Vec::with_capacity(rows);
        let mut counted_rows = 0;
        for row in 0..rows {
            let t = targets.get(row);
            if t == ignore {
                out.push(Self::IGNORED);
            } else if t < 0 || t >= classes as i64 {
                return Err(Error::TargetOutOfRange { row, value: t, classes, ignore_index: ignore });
            } else {
                out.push(t as i32);
                counted_rows += 1;
            }
        }
        let weighted_count = match opts.get_weights() {
            Some(w) => out.iter().filter(|&&t| t != Self::IGNORED).map(|&t| f64::from(w[t as usize])).sum(),
            None => counted_rows as f64,
        };
        Ok(Self {
            rows,
            classes,
            targets: out,
            counted_rows,
            weighted_count,
            mean_denominator: opts.denominators.map(|d| d.0).or(opts.get_n_items()).unwrap_or(weighted_count),
            z_denominator: opts
                .denominators
                .map(|d| d.1)
                .or(opts.get_n_items())
                .unwrap_or(counted_rows as f64),
        })
    }

    /// The divisor that turns the sum into the reduced loss, and scales the gradient: for
    /// `mean` the caller's `n_items` or the weighted count of non-ignored rows (0/0 = NaN
    /// when every row is ignored), 1 otherwise.
    pub fn divisor(&self, reduction: Reduction) -> f64 {
        match reduction {
            Reduction::Mean => self.mean_denominator,
            _ => 1.0,
        }
    }

    /// The reduced loss from the sum of the row losses: `None` for [`Reduction::None`],
    /// else the sum over [`divisor`](Self::divisor) (NaN for `mean` over no rows, as in
    /// PyTorch).
    pub fn reduce(&self, sum: f64, reduction: Reduction) -> Option<f32> {
        (reduction != Reduction::None).then(|| (sum / self.divisor(reduction)) as f32)
    }

    /// The factor of every row's gradient in f32: 1 / [`divisor`](Self::divisor), or 0
    /// when nothing is counted (every row ignored: the gradient is 0, not NaN).
    pub fn gradient_scale(&self, reduction: Reduction) -> f32 {
        let divisor = self.divisor(reduction);
        if divisor != 0.0 { (1.0 / divisor) as f32 } else { 0.0 }
    }

    /// The divisor of the z-loss part: for `mean` `n_items` or the number of counted
    /// rows, 1 otherwise.
    pub fn z_divisor(&self, reduction: Reduction) -> f64 {
        match reduction {
            Reduction::Mean => self.z_denominator,
            _ => 1.0,
        }
    }

    /// The z-loss scale that the kernels' gradient takes so that, multiplied by
    /// [`gradient_scale`](Self::gradient_scale), the z-loss part of the gradient divides by
    /// [`z_divisor`](Self::z_divisor) instead: `s · divisor / z_divisor` (`s` when they
    /// agree: no class weights, or `n_items`).
    pub fn z_gradient_loss_scale(&self, z_loss: f64, reduction: Reduction) -> f64 {
        let (d, dz) = (self.divisor(reduction), self.z_divisor(reduction));
        if d == dz || dz == 0.0 { z_loss } else { z_loss * d / dz }
    }

    /// The reduced loss and its z-loss part from the sum of the row losses (z-loss
    /// included) and the sum of the z-loss terms `s · lse²` over the counted rows: the
    /// cross-entropy part divides by [`divisor`](Self::divisor), the z-loss part by
    /// [`z_divisor`](Self::z_divisor). `None` for [`Reduction::None`].
    pub fn reduce_with_z(&self, sum: f64, z_sum: f64, reduction: Reduction) -> (Option<f32>, Option<f32>) {
        if reduction == Reduction::None {
            return (None, None);
        }
        if z_sum == 0.0 {
            return (Some((sum / self.divisor(reduction)) as f32), Some(0.0));
        }
        let z = z_sum / self.z_divisor(reduction);
        (Some(((sum - z_sum) / self.divisor(reduction) + z) as f32), Some(z as f32))
    }
}
