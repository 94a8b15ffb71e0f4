//! The cells of the support matrix that the fast CPU path computes itself, each served by
//! one of the functions of [`super::fast`]; the front door composes the rest (half
//! precision, gradients in the input's type) from them in row blocks.

use rayon::prelude::*;

use crate::error::Result;
use crate::front::{Native, with_outputs};
use crate::options::{LossOptions, LossOutput, Reduction, Upstream};
use crate::problem::{Gradient, Labels, Logits, Mode, Problem};

use super::fast;

impl Native for crate::CpuFast {
    fn takes(&self, problem: &Problem<'_>, _: &LossOptions) -> bool {
        matches!(
            (&problem.logits, &problem.gradient, &problem.mode, &problem.labels),
            (Logits::F32(_), Gradient::None | Gradient::IntoF32(_), _, _)
                | (Logits::F32Mut(_), Gradient::InPlace, Mode::Fused, Labels::Classes(_))
        )
    }

    fn native(&self, problem: Problem<'_>, opts: &LossOptions) -> Result<LossOutput> {
        let o = with_outputs(&problem, opts);
        let v = problem.classes;
        match (problem.logits, problem.gradient, problem.mode, problem.labels) {
            (Logits::F32Mut(x), Gradient::InPlace, Mode::Fused, Labels::Classes(t)) => {
                fast::cross_entropy_in_place(x, v, t, &o)
            }
            (Logits::F32(x), gradient, Mode::Fused, Labels::Classes(t)) => match gradient {
                Gradient::IntoF32(g) => fast::cross_entropy_into(x, v, t, &o, g),
                _ => fast::cross_entropy(x, v, t, &o),
            },
            (Logits::F32(x), gradient, Mode::Backward { lse, upstream }, Labels::Classes(t)) => {
                let lse = lse.expect("checked: a cross-entropy backward has its LSE");
                let g = fast::cross_entropy_backward(x, v, t, lse, upstream, &o)?;
                if let Gradient::IntoF32(out) = gradient {
                    out.copy_from_slice(&g);
                }
                Ok(LossOutput::default())
            }
            (Logits::F32(x), gradient, Mode::Backward { lse, upstream }, Labels::Probabilities(t)) => {
                let lse = lse.expect("checked: a cross-entropy backward has its LSE");
                if let Gradient::IntoF32(out) = gradient {
                    soft_backward(x, v, t, lse, upstream, &o, out)?;
                }
                Ok(LossOutput::default())
            }
            (Logits::F32(x), gradient, Mode::Fused, Labels::Probabilities(t)) => {
                let mut out = fast::cross_entropy_soft(x, v, t, &o)?;
                into(&mut out, gradient, Upstream::Scalar(1.0));
                Ok(out)
            }
            (Logits::F32(x), gradient, mode, Labels::Binary(t)) => {
                let mut out = fast::binary_cross_entropy(x, v, t, &o)?;
                match mode {
                    Mode::Fused => into(&mut out, gradient, Upstream::Scalar(1.0)),
                    // Binary cross-entropy's gradient is linear in the upstream gradient.
                    Mode::Backward { upstream, .. } => {
                        into(&mut out, gradient, upstream);
                        out = LossOutput::default();
                    }
                }
                Ok(out)
            }
            _ => unreachable!("takes() accepted the problem"),
        }
    }

    fn linear(&self, task: crate::head::LinearTask<'_>, opts: &LossOptions) -> Result<LossOutput> {
        super::fast_linear::linear(task, opts)
    }
}

/// Moves the gradient of `out` into the caller's slice, times the upstream gradient.
fn into(out: &mut LossOutput, gradient: Gradient<'_>, upstream: Upstream<'_>) {
    let (Some(g), Gradient::IntoF32(dst)) = (out.gradient.take(), gradient) else { return };
    match upstream {
        Upstream::Scalar(1.0) => dst.copy_from_slice(&g),
        _ => dst.iter_mut().zip(&g).enumerate().for_each(|(i, (d, &x))| *d = x * upstream.of_row(i)),
    }
}

/// The separate backward of probability targets: `(p_j (Σ w t' + 2 s lse) − w_j t'_j) ·
/// dz/dx / D · g_r` with `p` from the saved LSE; rows in parallel.
fn soft_backward(
    x: &[f32],
    v: usize,
    targets: &[f32],
    lse: &[f32],
    upstream: Upstream<'_>,
    opts: &LossOptions,
    out: &mut [f32],
) -> Result<()> {
    let (denom, _) = crate::options::check_soft(x.len(), targets.len(), v, opts)?;
    let d = if opts.get_reduction() == Reduction::Mean { denom } else { 1.0 };
    let eps = opts.get_label_smoothing() as f32;
    let s = opts.get_z_loss() as f32;
    let alpha = opts.get_logit_scale() as f32;
    let cap = opts.get_softcap().map(|c| c as f32);
    let weights = opts.get_weights();
    let smooth = eps / v as f32;
    out.par_chunks_mut(v).zip(x.par_chunks(v)).zip(targets.par_chunks(v)).enumerate().for_each(
        |(r, ((g, xs), ts))| {
            let w = |c: usize| weights.map_or(1.0, |w| w[c]);
            let t = |c: usize| (1.0 - eps) * ts[c] + smooth;
            let a: f64 = (0..v).map(|c| f64::from(w(c) * t(c))).sum();
            let l = lse[r];
            let k = a as f32 + 2.0 * s * l;
            let scale = (f64::from(upstream.of_row(r)) / d) as f32;
            for (c, out) in g.iter_mut().enumerate() {
                let (z, dz) = match cap {
                    Some(cap) => {
                        let th = (alpha * xs[c] / cap).tanh();
                        (cap * th, alpha * (1.0 - th * th))
                    }
                    None => (alpha * xs[c], alpha),
                };
                *out = ((z - l).exp() * k - w(c) * t(c)) * dz * scale;
            }
        },
    );
    Ok(())
}
