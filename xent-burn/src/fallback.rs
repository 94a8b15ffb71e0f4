//! The loss with burn's own tensor operations, for devices where xent's kernels do not
//! run: the same definitions (shared/docs/semantics.md), differentiated by burn's
//! autodiff. The logits' max is taken out of the log-sum-exp as a constant (the
//! gradient is the same, and large logits do not overflow).

use burn::tensor::{Int, Tensor};
use xent::{LossOptions, Reduction};

/// The logits the loss sees: `α x`, then `c · tanh(α x / c)` with a softcap.
fn transformed(logits: Tensor<2>, o: &LossOptions) -> Tensor<2> {
    let a = o.get_logit_scale();
    let z = if a != 1.0 { logits.mul_scalar(a as f32) } else { logits };
    match o.get_softcap() {
        Some(c) => z.div_scalar(c as f32).tanh().mul_scalar(c as f32),
        None => z,
    }
}

/// Each row's log-sum-exp [N, 1].
fn log_sum_exp(z: &Tensor<2>) -> Tensor<2> {
    let m = z.clone().max_dim(1).detach();
    m.clone() + (z.clone() - m).exp().sum_dim(1).log()
}

/// `mean`, `sum` or `none` of the cross-entropy part `ce` and the z-loss part `zl` (each
/// row's, [N]) with their `mean` denominators.
fn reduce(ce: Tensor<1>, zl: Option<Tensor<1>>, o: &LossOptions, d: Tensor<1>, dz: Tensor<1>) -> Tensor<1> {
    match o.get_reduction() {
        Reduction::None => match zl {
            Some(z) => ce + z,
            None => ce,
        },
        Reduction::Sum => match zl {
            Some(z) => (ce + z).sum(),
            None => ce.sum(),
        },
        Reduction::Mean => {
            let (d, dz) = match o.get_n_items() {
                Some(k) => (d.zeros_like().add_scalar(k as f32), dz.zeros_like().add_scalar(k as f32)),
                None => (d, dz),
            };
            match zl {
                Some(z) => ce.sum() / d + z.sum() / dz,
                None => ce.sum() / d,
            }
        }
    }
}

/// The rows that do not count [N]: `ignore_index`, and targets outside [0, V).
pub(crate) fn ignored_rows(
    targets: &Tensor<1, Int>,
    v: usize,
    o: &LossOptions,
) -> Tensor<1, burn::tensor::Bool> {
    targets
        .clone()
        .equal_elem(o.get_ignore_index())
        .bool_or(targets.clone().lower_elem(0))
        .bool_or(targets.clone().greater_equal_elem(v as i64))
}

/// Class-index cross-entropy with every option.
pub(crate) fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>, o: &LossOptions) -> Tensor<1> {
    let [_, v] = logits.dims();
    let device = logits.device();
    let z = transformed(logits, o);
    let lse = log_sum_exp(&z);
    let ignored = ignored_rows(&targets, v, o);
    let keep = ignored.clone().bool_not().float();
    let safe = targets.mask_fill(ignored, 0);
    let z_y = z.clone().gather(1, safe.clone().unsqueeze_dim(1));
    let nll = (lse.clone() - z_y).squeeze_dim::<1>(1);
    let eps = o.get_label_smoothing() as f32;
    let w = o.get_weights().map(|w| Tensor::<1>::from_floats(w, &device));
    let w_y = w.as_ref().map(|w| w.clone().select(0, safe));
    let mut ce = match &w_y {
        Some(wy) => nll * wy.clone(),
        None => nll,
    }
    .mul_scalar(1.0 - eps);
    if eps > 0.0 {
        let diff = lse.clone() - z;
        let smooth = match &w {
            Some(w) => (diff * w.clone().unsqueeze_dim(0)).sum_dim(1),
            None => diff.sum_dim(1),
        };
        ce = ce + smooth.squeeze_dim::<1>(1).mul_scalar(eps / v as f32);
    }
    let ce = ce * keep.clone();
    let s = o.get_z_loss() as f32;
    let zl = (s > 0.0).then(|| lse.squeeze_dim::<1>(1).powi_scalar(2).mul_scalar(s) * keep.clone());
    let d = match w_y {
        Some(wy) => (wy * keep.clone()).sum(),
        None => keep.clone().sum(),
    };
    reduce(ce, zl, o, d, keep.sum())
}

/// Cross-entropy against probability targets with every option (`mean` divides by N).
pub(crate) fn cross_entropy_probs(logits: Tensor<2>, targets: Tensor<2>, o: &LossOptions) -> Tensor<1> {
    let [n, v] = logits.dims();
    let device = logits.device();
    let z = transformed(logits, o);
    let lse = log_sum_exp(&z);
    let eps = o.get_label_smoothing() as f32;
    let t = targets.detach().mul_scalar(1.0 - eps).add_scalar(eps / v as f32);
    let wt = match o.get_weights() {
        Some(w) => t * Tensor::<1>::from_floats(w, &device).unsqueeze_dim(0),
        None => t,
    };
    // Terms of weight 0 are left out (a −inf logit with target 0 adds nothing).
    let zero = wt.clone().equal_elem(0.0);
    let ce = ((lse.clone() - z) * wt).mask_fill(zero, 0.0).sum_dim(1).squeeze_dim::<1>(1);
    let s = o.get_z_loss() as f32;
    let zl = (s > 0.0).then(|| lse.squeeze_dim::<1>(1).powi_scalar(2).mul_scalar(s));
    let rows = Tensor::<1>::from_floats([n as f32], &device);
    reduce(ce, zl, o, rows.clone(), rows)
}

/// Binary cross-entropy with logits: `w · [(1 − y) x + (1 + (pw − 1) y) · softplus(−x)]`
/// per element, `softplus(−x) = max(−x, 0) + log(1 + exp(−|x|))`; `mean` over N·V.
pub(crate) fn binary_cross_entropy_with_logits(
    logits: Tensor<2>,
    targets: Tensor<2>,
    o: &LossOptions,
) -> Tensor<2> {
    let [n, v] = logits.dims();
    let device = logits.device();
    let y = targets.detach();
    let softplus = logits.clone().neg().clamp_min(0.0) + logits.clone().abs().neg().exp().log1p();
    let pos = match o.get_pos_weight() {
        Some(pw) => y.clone() * Tensor::<1>::from_floats(pw, &device).sub_scalar(1.0).unsqueeze_dim(0),
        None => y.zeros_like(),
    }
    .add_scalar(1.0);
    let mut l = y.neg().add_scalar(1.0) * logits + pos * softplus;
    if let Some(w) = o.get_weights() {
        l = l * Tensor::<1>::from_floats(w, &device).unsqueeze_dim(0);
    }
    match o.get_reduction() {
        Reduction::None => l,
        Reduction::Sum => l.sum().reshape([1, 1]),
        Reduction::Mean => {
            let d = o.get_n_items().unwrap_or((n * v) as f64) as f32;
            l.sum().div_scalar(d).reshape([1, 1])
        }
    }
}
