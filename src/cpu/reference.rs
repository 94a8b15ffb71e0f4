//! The f64 reference: plain, two-pass, obviously correct code that follows
//! `shared/docs/semantics.md` line by line. Slow on purpose; it validates every other path.

use crate::error::Result;
use crate::options::{Batch, LossOptions, LossOutput, Reduction, Targets, Upstream};

/// Per-row results of the reference, in f64.
#[derive(Clone, Debug)]
pub struct ReferenceRows {
    /// `ℓ` of each row (0 for ignored rows).
    pub losses: Vec<f64>,
    /// `lse` of each row.
    pub lse: Vec<f64>,
}

/// Log-sum-exp of one row in f64: NaN for a row with a NaN or +inf entry, −inf for a row
/// of only −inf (as `torch.logsumexp`; its loss `lse − x_t` is then NaN).
pub fn row_lse(row: &[f32]) -> f64 {
    let mut max = f64::NEG_INFINITY;
    for &x in row {
        let x = f64::from(x);
        if x.is_nan() || x == f64::INFINITY {
            return f64::NAN;
        }
        max = max.max(x);
    }
    if max == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let sum: f64 = row.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    max + sum.ln()
}

/// The reference loss (and gradient, if asked) in f64, returned as f32 results.
pub fn cross_entropy<'t>(
    logits: &[f32],
    classes: usize,
    targets: impl Into<Targets<'t>>,
    opts: &LossOptions,
) -> Result<LossOutput> {
    let batch = Batch::new(logits.len(), classes, targets.into(), opts)?;
    let rows = rows_f64(logits, &batch, opts);
    let mut out = assemble(&rows, &batch, opts);
    if opts.wants_gradient() {
        out.gradient = Some(gradient(logits, &rows, &batch, opts));
    }
    Ok(out)
}

/// As [`cross_entropy`], with the gradient written into `grad`.
pub fn cross_entropy_into<'t>(
    logits: &[f32],
    classes: usize,
    targets: impl Into<Targets<'t>>,
    opts: &LossOptions,
    grad: &mut [f32],
) -> Result<LossOutput> {
    let batch = Batch::new(logits.len(), classes, targets.into(), opts)?;
    crate::gpu::check_grad_len(grad.len(), logits.len())?;
    let rows = rows_f64(logits, &batch, opts);
    let out = assemble(&rows, &batch, opts);
    grad.copy_from_slice(&gradient(logits, &rows, &batch, opts));
    Ok(out)
}

/// As [`cross_entropy`], with the gradient written over `logits`.
pub fn cross_entropy_in_place<'t>(
    logits: &mut [f32],
    classes: usize,
    targets: impl Into<Targets<'t>>,
    opts: &LossOptions,
) -> Result<LossOutput> {
    let batch = Batch::new(logits.len(), classes, targets.into(), opts)?;
    let rows = rows_f64(logits, &batch, opts);
    let out = assemble(&rows, &batch, opts);
    let grad = gradient(logits, &rows, &batch, opts);
    logits.copy_from_slice(&grad);
    Ok(out)
}

/// The logit transform in f64: scale, then softcap (the loss sees `c · tanh(α x / c)`),
/// and its derivative.
fn transform(x: f64, opts: &LossOptions) -> (f64, f64) {
    let alpha = opts.get_logit_scale();
    match opts.get_softcap() {
        Some(c) => {
            let t = (alpha * x / c).tanh();
            (c * t, alpha * (1.0 - t * t))
        }
        None => (alpha * x, alpha),
    }
}

/// Per-row losses and LSE in f64 (for tests that want the unrounded values).
pub fn rows_f64(logits: &[f32], batch: &Batch, opts: &LossOptions) -> ReferenceRows {
    let v = batch.classes;
    let eps = opts.get_label_smoothing();
    let zl = opts.get_z_loss();
    let w = |c: usize| opts.get_weights().map_or(1.0, |w| f64::from(w[c]));
    let mut losses = Vec::with_capacity(batch.rows);
    let mut lse = Vec::with_capacity(batch.rows);
    for (r, &t) in batch.targets.iter().enumerate() {
        let z: Vec<f64> =
            logits[r * v..(r + 1) * v].iter().map(|&x| transform(f64::from(x), opts).0).collect();
        let l = lse_f64(&z);
        lse.push(l);
        if t == Batch::IGNORED {
            losses.push(0.0);
            continue;
        }
        let y = t as usize;
        let mut loss = (1.0 - eps) * w(y) * (l - z[y]);
        if eps > 0.0 {
            loss += eps / v as f64 * (0..v).map(|c| w(c) * (l - z[c])).sum::<f64>();
        }
        if zl > 0.0 {
            loss += zl * l * l;
        }
        losses.push(loss);
    }
    ReferenceRows { losses, lse }
}

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

fn assemble(rows: &ReferenceRows, batch: &Batch, opts: &LossOptions) -> LossOutput {
    let sum: f64 = rows.losses.iter().sum();
    // 0/0 = NaN for an empty or fully ignored batch, as in PyTorch.
    let loss = batch.reduce(sum, opts.get_reduction());
    LossOutput {
        loss,
        row_losses: opts.wants_row_losses().then(|| rows.losses.iter().map(|&l| l as f32).collect()),
        lse: opts.wants_lse().then(|| rows.lse.iter().map(|&l| l as f32).collect()),
        gradient: None,
    }
}

/// The separate backward: the gradient of the loss `opts` describes, from the logits and
/// the per-row LSE a forward saved, times the upstream gradient (f64 inside).
pub fn cross_entropy_backward<'t>(
    logits: &[f32],
    classes: usize,
    targets: impl Into<Targets<'t>>,
    lse: &[f32],
    upstream: Upstream<'_>,
    opts: &LossOptions,
) -> Result<Vec<f32>> {
    let batch = Batch::new(logits.len(), classes, targets.into(), opts)?;
    check_lse(lse, batch.rows)?;
    upstream.check(batch.rows)?;
    let rows =
        ReferenceRows { losses: vec![0.0; batch.rows], lse: lse.iter().map(|&l| f64::from(l)).collect() };
    let mut grad = gradient(logits, &rows, &batch, opts);
    for (r, row) in grad.chunks_mut(classes).enumerate() {
        let g = f64::from(upstream.of_row(r));
        row.iter_mut().for_each(|x| *x = (f64::from(*x) * g) as f32);
    }
    Ok(grad)
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

fn gradient(logits: &[f32], rows: &ReferenceRows, batch: &Batch, opts: &LossOptions) -> Vec<f32> {
    let v = batch.classes;
    let scale = 1.0 / batch.divisor(opts.get_reduction());
    let eps = opts.get_label_smoothing();
    let zl = opts.get_z_loss();
    let w = |c: usize| opts.get_weights().map_or(1.0, |w| f64::from(w[c]));
    let total_w: f64 = (0..v).map(w).sum();
    let mut grad = vec![0.0f32; logits.len()];
    for (r, &t) in batch.targets.iter().enumerate() {
        if t == Batch::IGNORED {
            continue;
        }
        let (y, lse) = (t as usize, rows.lse[r]);
        // d loss / d z_j = p_j · k − (1 − ε) w_y δ_jy − (ε / V) w_j
        let mut k = (1.0 - eps) * w(y);
        if eps > 0.0 {
            k += eps / v as f64 * total_w;
        }
        if zl > 0.0 {
            k += 2.0 * zl * lse;
        }
        for c in 0..v {
            let (z, dz) = transform(f64::from(logits[r * v + c]), opts);
            let p = (z - lse).exp();
            let mut g = p * k;
            if c == y {
                g -= (1.0 - eps) * w(y);
            }
            if eps > 0.0 {
                g -= eps / v as f64 * w(c);
            }
            grad[r * v + c] = (g * dz * scale) as f32;
        }
    }
    grad
}

/// Binary (multilabel) cross-entropy with logits, as PyTorch's
/// `binary_cross_entropy_with_logits`: per element
/// `w · [(1 − y) x + (1 + (pw − 1) y) softplus(−x)]`, `w` and `pw` per class;
/// `mean` over N·V (or `n_items`). For `none`, `row_losses` holds the [N, V] element
/// losses.
pub fn binary_cross_entropy(
    logits: &[f32],
    classes: usize,
    targets: &[f32],
    opts: &LossOptions,
) -> Result<LossOutput> {
    let rows = crate::options::check_binary(logits.len(), targets.len(), classes, opts)?;
    let w = |c: usize| opts.get_weights().map_or(1.0, |w| f64::from(w[c]));
    let pw = |c: usize| opts.get_pos_weight().map_or(1.0, |w| f64::from(w[c]));
    let denom = match opts.get_reduction() {
        Reduction::Mean => opts.get_n_items().unwrap_or((rows * classes) as f64),
        _ => 1.0,
    };
    let mut losses = Vec::with_capacity(logits.len());
    let mut grad = vec![0.0f32; if opts.wants_gradient() { logits.len() } else { 0 }];
    for (i, (&x, &y)) in logits.iter().zip(targets).enumerate() {
        let (x, y, c) = (f64::from(x), f64::from(y), i % classes);
        let softplus_neg = (-x).max(0.0) + (-x.abs()).exp().ln_1p();
        let coef = 1.0 + (pw(c) - 1.0) * y;
        losses.push(w(c) * ((1.0 - y) * x + coef * softplus_neg));
        if opts.wants_gradient() {
            let sigma = 1.0 / (1.0 + (-x).exp());
            grad[i] = (w(c) * (coef * sigma - pw(c) * y) / denom) as f32;
        }
    }
    let total: f64 = losses.iter().sum();
    Ok(LossOutput {
        loss: (opts.get_reduction() != Reduction::None).then(|| (total / denom) as f32),
        row_losses: opts.wants_row_losses().then(|| losses.iter().map(|&l| l as f32).collect()),
        lse: None,
        gradient: opts.wants_gradient().then_some(grad),
    })
}

/// Cross-entropy with probability (soft) targets [rows, classes], as PyTorch's
/// `cross_entropy` with float targets: smoothing applies to the targets
/// (`t' = (1 − ε) t + ε/V`), each class weighs by its own weight, `mean` divides by the
/// number of rows (or `n_items`), never by weights; `ignore_index` does not apply.
pub fn cross_entropy_soft(
    logits: &[f32],
    classes: usize,
    targets: &[f32],
    opts: &LossOptions,
) -> Result<LossOutput> {
    let (denom, rows) = crate::options::check_soft(logits.len(), targets.len(), classes, opts)?;
    let v = classes;
    let eps = opts.get_label_smoothing();
    let zl = opts.get_z_loss();
    let w = |c: usize| opts.get_weights().map_or(1.0, |w| f64::from(w[c]));
    let d = match opts.get_reduction() {
        Reduction::Mean => denom,
        _ => 1.0,
    };
    let mut losses = Vec::with_capacity(rows);
    let mut lses = Vec::with_capacity(rows);
    let mut grad = vec![0.0f32; if opts.wants_gradient() { logits.len() } else { 0 }];
    for r in 0..rows {
        let xs = &logits[r * v..(r + 1) * v];
        let zs: Vec<(f64, f64)> = xs.iter().map(|&x| transform(f64::from(x), opts)).collect();
        let z: Vec<f64> = zs.iter().map(|p| p.0).collect();
        let l = lse_f64(&z);
        let t = |c: usize| (1.0 - eps) * f64::from(targets[r * v + c]) + eps / v as f64;
        let a: f64 = (0..v).map(|c| w(c) * t(c)).sum();
        let mut loss: f64 = (0..v).filter(|&c| w(c) * t(c) != 0.0).map(|c| w(c) * t(c) * (l - z[c])).sum();
        if zl > 0.0 {
            loss += zl * l * l;
        }
        losses.push(loss);
        lses.push(l);
        if opts.wants_gradient() {
            for c in 0..v {
                let p = (z[c] - l).exp();
                grad[r * v + c] = ((p * (a + 2.0 * zl * l) - w(c) * t(c)) * zs[c].1 / d) as f32;
            }
        }
    }
    let total: f64 = losses.iter().sum();
    Ok(LossOutput {
        loss: (opts.get_reduction() != Reduction::None).then(|| (total / d) as f32),
        row_losses: opts.wants_row_losses().then(|| losses.iter().map(|&l| l as f32).collect()),
        lse: opts.wants_lse().then(|| lses.iter().map(|&l| l as f32).collect()),
        gradient: opts.wants_gradient().then_some(grad),
    })
}

/// Half-precision logits (raw f16 or bf16 bits): widened exactly to f32, then the
/// reference. The gradient, when asked, is f32.
pub fn cross_entropy_half<'t>(
    logits: &[u16],
    format: crate::HalfFormat,
    classes: usize,
    targets: impl Into<Targets<'t>>,
    opts: &LossOptions,
) -> Result<LossOutput> {
    let wide: Vec<f32> = logits.iter().map(|&h| format.to_f32(h)).collect();
    cross_entropy(&wide, classes, targets, opts)
}
