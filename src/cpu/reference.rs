//! The f64 reference: plain, two-pass, obviously correct code that follows
//! `shared/docs/semantics.md` line by line. Slow on purpose; it validates every other path.
//! Reached through [`crate::Reference`]'s [`evaluate`](crate::Backend::evaluate): it
//! computes f32 logits itself (loss, gradient into a slice, separate backward) for every
//! label kind; half-precision logits, in-place gradients and half gradients are the front
//! door's exact widening and single rounding around it.

use crate::error::Result;
use crate::front::Native;
use crate::metrics::{Metrics, RowMetrics, target_class};
use crate::options::{Batch, LossOptions, LossOutput, Reduction, Targets, Upstream};
use crate::problem::{Gradient, Labels, Logits, Mode, Problem};

/// Log-sum-exp of f64 values: NaN with a NaN or +inf, −inf when all are −inf.
fn lse_f64(z: &[f64]) -> f64 {
    let mut max = f64::NEG_INFINITY;
    for &x in z {
        if x.is_nan() || x == f64::INFINITY {
            return f64::NAN;
        }
        max = max.max(x);
    }
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    max + z.iter().map(|&x| (x - max).exp()).sum::<f64>().ln()
}

/// The logit transform in f64: scale, then softcap (the loss sees `c · tanh(α x / c)`),
/// and its derivative.
pub(crate) fn transform(x: f64, opts: &LossOptions) -> (f64, f64) {
    let alpha = opts.get_logit_scale();
    match opts.get_softcap() {
        Some(c) => {
            let t = (alpha * x / c).tanh();
            (c * t, alpha * (1.0 - t * t))
        }
        None => (alpha * x, alpha),
    }
}

impl Native for crate::Reference {
    fn takes(&self, problem: &Problem<'_>, _: &LossOptions) -> bool {
        matches!(problem.logits, Logits::F32(_))
            && matches!(problem.gradient, Gradient::None | Gradient::IntoF32(_))
    }

    fn native(&self, problem: Problem<'_>, opts: &LossOptions) -> Result<LossOutput> {
        let Problem { logits: Logits::F32(x), classes: v, labels, gradient, mode, row_losses, lse } = problem
        else {
            unreachable!("takes() accepts f32 logits only")
        };
        let grad = match gradient {
            Gradient::IntoF32(g) => Some(g),
            _ => None,
        };
        let want = Want { row_losses: row_losses || opts.get_reduction() == Reduction::None, lse };
        let e = Eval { x, v, mode, grad, want };
        match labels {
            Labels::Classes(t) => classes(e, t, opts),
            Labels::Probabilities(t) => probabilities(e, t, opts),
            Labels::Binary(t) => binary(e, t, opts),
        }
    }

    fn linear(&self, task: crate::head::LinearTask<'_>, opts: &LossOptions) -> Result<LossOutput> {
        super::reference_linear::linear(task, opts)
    }
}

/// One evaluation of f32 logits [rows, v]: how, where the gradient goes, what to return.
struct Eval<'a, 'g> {
    x: &'a [f32],
    v: usize,
    mode: Mode<'a>,
    grad: Option<&'g mut [f32]>,
    want: Want,
}

impl<'a> Eval<'a, '_> {
    /// The saved LSE of a backward (`None` when fused), and the upstream gradient (1 when
    /// fused).
    fn saved_and_upstream(&self) -> (Option<&'a [f32]>, Upstream<'a>) {
        match self.mode {
            Mode::Fused => (None, Upstream::Scalar(1.0)),
            Mode::Backward { lse, upstream } => (lse, upstream),
        }
    }
}

/// Which per-row outputs are asked for.
#[derive(Clone, Copy)]
struct Want {
    row_losses: bool,
    lse: bool,
}

/// The output of a fused evaluation from f64 row values.
fn output(
    losses: &[f64],
    lses: &[f64],
    loss: Option<f32>,
    z_loss: Option<f32>,
    want: Want,
    mode: &Mode<'_>,
    metrics: Option<Metrics>,
) -> LossOutput {
    if matches!(mode, Mode::Backward { .. }) {
        return LossOutput::default();
    }
    LossOutput {
        loss,
        row_losses: want.row_losses.then(|| losses.iter().map(|&l| l as f32).collect()),
        lse: want.lse.then(|| lses.iter().map(|&l| l as f32).collect()),
        gradient: None,
        z_loss,
        metrics,
        ..Default::default()
    }
}

/// Class-index targets: row losses `m · [(1−ε) w_y (lse − z_y) + (ε/V) Σ_c w_c (lse − z_c)
/// + s lse²]`; `mean` divides the cross-entropy part by Σ m w_y and the z-loss part by
/// Σ m (both by `n_items` when given).
fn classes(e: Eval<'_, '_>, targets: Targets<'_>, opts: &LossOptions) -> Result<LossOutput> {
    let (saved, upstream) = e.saved_and_upstream();
    let Eval { x, v, mode, grad, want } = e;
    let batch = Batch::new(x.len(), v, targets, opts)?;
    let rows = ClassRows { batch: &batch, saved, upstream, opts };
    let raw = |r: usize, z: &mut Vec<f64>| z.extend(x[r * v..(r + 1) * v].iter().map(|&x| f64::from(x)));
    let out = match grad {
        Some(grad) => {
            let mut write = |r: usize, g: &[f64]| {
                grad[r * v..(r + 1) * v].iter_mut().zip(g).for_each(|(o, &g)| *o = g as f32);
            };
            rows.evaluate(raw, Some(&mut write))
        }
        None => rows.evaluate(raw, None),
    };
    let (loss, z_loss) = batch.reduce_with_z(out.sum, out.z_sum, opts.get_reduction());
    let z_loss = z_loss.filter(|_| opts.get_z_loss() > 0.0);
    let metrics = opts.get_metrics().map(|spec| Metrics::from_rows(spec, &out.metrics));
    Ok(output(&out.losses, &out.lses, loss, z_loss, want, &mode, metrics))
}

/// Rows of class-index cross-entropy whose raw logits come from a function: the plain
/// logits, or a linear head's products in f64.
pub(crate) struct ClassRows<'a> {
    /// The checked targets and denominators.
    pub batch: &'a Batch,
    /// The saved LSE of a backward, or `None` (computed).
    pub saved: Option<&'a [f32]>,
    /// The upstream gradient (1 when fused).
    pub upstream: Upstream<'a>,
    /// The options.
    pub opts: &'a LossOptions,
}

/// Receives each row's ∂loss/∂x from [`ClassRows::evaluate`].
pub(crate) type RowGradient<'g> = &'g mut dyn FnMut(usize, &[f64]);

/// What [`ClassRows::evaluate`] returns: per-row losses and LSE, the sum of the losses and
/// of their z-loss terms, and each row's metrics when the options ask for them.
pub(crate) struct RowsOut {
    pub losses: Vec<f64>,
    pub lses: Vec<f64>,
    pub sum: f64,
    pub z_sum: f64,
    pub metrics: Vec<RowMetrics>,
}

impl ClassRows<'_> {
    /// Evaluates every row: `raw(r, z)` appends row `r`'s raw logits (before scale and
    /// softcap) to `z`; `grad`, when given, receives each row's ∂loss/∂x (times the
    /// upstream gradient; zeros for an ignored row).
    pub fn evaluate(&self, raw: impl Fn(usize, &mut Vec<f64>), mut grad: Option<RowGradient<'_>>) -> RowsOut {
        let (batch, opts) = (self.batch, self.opts);
        let v = batch.classes;
        let reduction = opts.get_reduction();
        let eps = opts.get_label_smoothing();
        let s = opts.get_z_loss();
        let weights = ClassWeights::new(opts, v);
        let w = |c: usize| weights.of(c);
        let d = batch.divisor(reduction);
        let ce_scale = if d != 0.0 { 1.0 / d } else { 0.0 };
        let z_scale = 1.0 / batch.z_divisor(reduction);
        let mut out =
            RowsOut { losses: Vec::new(), lses: Vec::new(), sum: 0.0, z_sum: 0.0, metrics: Vec::new() };
        let want_metrics = opts.get_metrics().is_some();
        let (mut x, mut g) = (Vec::with_capacity(v), vec![0.0f64; v]);
        for (r, &t) in batch.targets.iter().enumerate() {
            x.clear();
            raw(r, &mut x);
            let zs: Vec<(f64, f64)> = x.iter().map(|&x| transform(x, opts)).collect();
            let z: Vec<f64> = zs.iter().map(|p| p.0).collect();
            let l = match self.saved {
                Some(saved) => f64::from(saved[r]),
                None => lse_f64(&z),
            };
            out.lses.push(l);
            if want_metrics {
                out.metrics.push(RowMetrics::of_row(&z, (t != Batch::IGNORED).then_some(t as usize)));
            }
            if t == Batch::IGNORED {
                out.losses.push(0.0);
                if let Some(grad) = grad.as_deref_mut() {
                    g.fill(0.0);
                    grad(r, &g);
                }
                continue;
            }
            let y = t as usize;
            let mut loss = (1.0 - eps) * w(y) * (l - z[y]);
            if eps > 0.0 {
                loss += eps / v as f64 * (0..v).map(|c| w(c) * (l - z[c])).sum::<f64>();
            }
            if s > 0.0 {
                loss += s * l * l;
                out.z_sum += s * l * l;
            }
            out.sum += loss;
            out.losses.push(loss);
            let Some(grad) = grad.as_deref_mut() else { continue };
            let up = f64::from(self.upstream.of_row(r));
            let row = ClassGrad::new(y, l, &weights, v, opts, (ce_scale, z_scale));
            for (c, out) in g.iter_mut().enumerate() {
                let (z, dz) = zs[c];
                *out = row.at(c, z, dz, &weights) * up;
            }
            grad(r, &g);
        }
        out
    }
}

/// The class weights of a problem in f64 (1 without), and their total over the classes.
pub(crate) struct ClassWeights<'a> {
    weights: Option<&'a [f32]>,
    /// Σ_c w_c over every class.
    pub total: f64,
}

impl<'a> ClassWeights<'a> {
    pub fn new(opts: &'a LossOptions, classes: usize) -> Self {
        let weights = opts.get_weights();
        let total = weights.map_or(classes as f64, |w| w.iter().map(|&x| f64::from(x)).sum());
        Self { weights, total }
    }

    /// w_c.
    pub fn of(&self, c: usize) -> f64 {
        self.weights.map_or(1.0, |w| f64::from(w[c]))
    }
}

/// ∂loss/∂x of one counted row of class indices, element by element:
/// `d loss / d z_c = [p_c k − (1 − ε) w_y δ_cy − (ε / V) w_c] / D + 2 s lse p_c / D_z`
/// with `k = (1 − ε) w_y + (ε / V) Σ w`, times `dz/dx`. Columns are those of the whole
/// vocabulary, so a shard of columns takes the same rule.
pub(crate) struct ClassGrad {
    y: usize,
    lse: f64,
    k: f64,
    w_y: f64,
    eps: f64,
    eps_v: f64,
    ce_scale: f64,
    z: Option<f64>,
}

impl ClassGrad {
    /// Row constants: target `y`, LSE `lse`, V `classes`, the scales `1 / D` and `1 / D_z`.
    pub fn new(
        y: usize,
        lse: f64,
        weights: &ClassWeights<'_>,
        classes: usize,
        opts: &LossOptions,
        (ce_scale, z_scale): (f64, f64),
    ) -> Self {
        let eps = opts.get_label_smoothing();
        let s = opts.get_z_loss();
        let w_y = weights.of(y);
        let mut k = (1.0 - eps) * w_y;
        if eps > 0.0 {
            k += eps / classes as f64 * weights.total;
        }
        let z = (s > 0.0).then_some(2.0 * s * lse * z_scale);
        Self { y, lse, k, w_y, eps, eps_v: eps / classes as f64, ce_scale, z }
    }

    /// The gradient of column `c` whose transformed logit is `z` (slope `dz`).
    pub fn at(&self, c: usize, z: f64, dz: f64, weights: &ClassWeights<'_>) -> f64 {
        let p = (z - self.lse).exp();
        let mut ce = p * self.k;
        if c == self.y {
            ce -= (1.0 - self.eps) * self.w_y;
        }
        if self.eps > 0.0 {
            ce -= self.eps_v * weights.of(c);
        }
        let mut d = ce * self.ce_scale;
        if let Some(z2) = self.z {
            d += z2 * p;
        }
        d * dz
    }
}

/// Probability targets: `t' = (1 − ε) t + ε/V`, row loss `Σ_c w_c t'_c (lse − z_c) + s lse²`,
/// `mean` over N (or `n_items`), never over weights; `ignore_index` does not apply.
fn probabilities(e: Eval<'_, '_>, targets: &[f32], opts: &LossOptions) -> Result<LossOutput> {
    let (saved, upstream) = e.saved_and_upstream();
    let Eval { x, v, mode, mut grad, want } = e;
    let (denom, rows) = crate::options::check_soft(x.len(), targets.len(), v, opts)?;
    let reduction = opts.get_reduction();
    let d = if reduction == Reduction::Mean { denom } else { 1.0 };
    let eps = opts.get_label_smoothing();
    let s = opts.get_z_loss();
    let w = |c: usize| opts.get_weights().map_or(1.0, |w| f64::from(w[c]));
    let mut losses = Vec::with_capacity(rows);
    let mut lses = Vec::with_capacity(rows);
    let mut row_metrics = Vec::new();
    let (mut sum, mut z_sum) = (0.0f64, 0.0f64);
    for r in 0..rows {
        let zs: Vec<(f64, f64)> =
            x[r * v..(r + 1) * v].iter().map(|&x| transform(f64::from(x), opts)).collect();
        let z: Vec<f64> = zs.iter().map(|p| p.0).collect();
        let l = match saved {
            Some(saved) => f64::from(saved[r]),
            None => lse_f64(&z),
        };
        if opts.get_metrics().is_some() {
            let target = target_class(&targets[r * v..(r + 1) * v]);
            row_metrics.push(RowMetrics::of_row(&z, Some(target)));
        }
        let t = |c: usize| (1.0 - eps) * f64::from(targets[r * v + c]) + eps / v as f64;
        let a: f64 = (0..v).map(|c| w(c) * t(c)).sum();
        let mut loss: f64 = (0..v).filter(|&c| w(c) * t(c) != 0.0).map(|c| w(c) * t(c) * (l - z[c])).sum();
        if s > 0.0 {
            loss += s * l * l;
            z_sum += s * l * l;
        }
        sum += loss;
        losses.push(loss);
        lses.push(l);
        if let Some(grad) = grad.as_deref_mut() {
            let g = f64::from(upstream.of_row(r));
            for c in 0..v {
                let p = (z[c] - l).exp();
                grad[r * v + c] = ((p * (a + 2.0 * s * l) - w(c) * t(c)) * zs[c].1 / d * g) as f32;
            }
        }
    }
    let reduced = reduction != Reduction::None;
    let loss = reduced.then(|| (sum / d) as f32);
    let z_loss = (reduced && s > 0.0).then(|| (z_sum / d) as f32);
    let metrics = opts.get_metrics().map(|spec| Metrics::from_rows(spec, &row_metrics));
    Ok(output(&losses, &lses, loss, z_loss, want, &mode, metrics))
}

/// Binary (multilabel) cross-entropy with logits, as PyTorch's
/// `binary_cross_entropy_with_logits`: per element
/// `w · [(1 − y) x + (1 + (pw − 1) y) softplus(−x)]`, `w` and `pw` per class; `mean` over
/// N·V (or `n_items`). For `none`, the row losses are the [N, V] element losses.
fn binary(e: Eval<'_, '_>, targets: &[f32], opts: &LossOptions) -> Result<LossOutput> {
    let (_, upstream) = e.saved_and_upstream();
    let Eval { x, v, mode, mut grad, want } = e;
    crate::options::check_binary(x.len(), targets.len(), v, opts)?;
    let reduction = opts.get_reduction();
    let d = if reduction == Reduction::Mean { opts.mean_denominator(x.len() as f64) } else { 1.0 };
    let w = |c: usize| opts.get_weights().map_or(1.0, |w| f64::from(w[c]));
    let pw = |c: usize| opts.get_pos_weight().map_or(1.0, |w| f64::from(w[c]));
    let mut losses = Vec::with_capacity(x.len());
    for (i, (&xi, &yi)) in x.iter().zip(targets).enumerate() {
        let (x, y, c) = (f64::from(xi), f64::from(yi), i % v);
        let softplus_neg = (-x).max(0.0) + (-x.abs()).exp().ln_1p();
        let coef = 1.0 + (pw(c) - 1.0) * y;
        losses.push(w(c) * ((1.0 - y) * x + coef * softplus_neg));
        if let Some(grad) = grad.as_deref_mut() {
            let sigma = 1.0 / (1.0 + (-x).exp());
            grad[i] = (w(c) * (coef * sigma - pw(c) * y) / d * f64::from(upstream.of_row(i))) as f32;
        }
    }
    let total: f64 = losses.iter().sum();
    let loss = (reduction != Reduction::None).then(|| (total / d) as f32);
    Ok(output(&losses, &[], loss, None, Want { lse: false, ..want }, &mode, None))
}

/// The saved LSE must have one value per row.
pub(crate) fn check_lse(lse: &[f32], rows: usize) -> Result<()> {
    if lse.len() != rows {
        return Err(crate::Error::Shape {
            what: "saved LSE (one per row)".into(),
            got: lse.len(),
            expected: rows,
        });
    }
    Ok(())
}
