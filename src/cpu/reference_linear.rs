//! The f64 reference of the linear head: each row's logits `x_j = b_j + Σ_k h_k W_jk`
//! summed in f64 (one row at a time, so [N, V] is never stored here either), the
//! class-index loss of [`ClassRows`] on them, and the gradients `dh = G W`, `dW = Gᵀ h`,
//! `db = Σ_rows G` accumulated in f64 in row order, rounded once to f32 at the end.

use super::reference::ClassRows;
use crate::error::Result;
use crate::head::LinearTask;
use crate::options::{LossOptions, LossOutput, Reduction, Upstream};
use crate::problem::Mode;

/// Evaluates a checked linear head in f64.
pub(crate) fn linear(task: LinearTask<'_>, opts: &LossOptions) -> Result<LossOutput> {
    let LinearTask {
        head,
        rows,
        classes: v,
        batch,
        mode,
        grad_hidden,
        grad_weight,
        grad_bias,
        row_losses,
        lse,
    } = task;
    let d = head.dim;
    let wide = |values: crate::head::Values<'_>| -> Vec<f64> {
        (0..values.len()).map(|i| f64::from(values.get(i))).collect()
    };
    let (h, w) = (wide(head.hidden), wide(head.weight));
    let b = head.bias.map(wide);
    let (saved, upstream) = match mode {
        Mode::Fused => (None, Upstream::Scalar(1.0)),
        Mode::Backward { lse, upstream } => (lse, upstream),
    };
    let raw = |r: usize, z: &mut Vec<f64>| {
        let hr = &h[r * d..(r + 1) * d];
        z.extend((0..v).map(|j| {
            let dot: f64 = hr.iter().zip(&w[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum();
            dot + b.as_ref().map_or(0.0, |b| b[j])
        }));
    };
    let rows_eval = ClassRows { batch: &batch, saved, upstream, opts };
    let want_grad = grad_hidden.is_some() || grad_weight.is_some() || grad_bias.is_some();
    let (mut dh, mut dw, mut db) = (
        vec![0.0f64; if grad_hidden.is_some() { rows * d } else { 0 }],
        vec![0.0f64; if grad_weight.is_some() { v * d } else { 0 }],
        vec![0.0f64; if grad_bias.is_some() { v } else { 0 }],
    );
    let out = if want_grad {
        let mut accumulate = |r: usize, g: &[f64]| {
            let hr = &h[r * d..(r + 1) * d];
            for (j, &gj) in g.iter().enumerate() {
                if gj == 0.0 {
                    continue;
                }
                let wj = &w[j * d..(j + 1) * d];
                if !dh.is_empty() {
                    dh[r * d..(r + 1) * d].iter_mut().zip(wj).for_each(|(o, &wk)| *o += gj * wk);
                }
                if !dw.is_empty() {
                    dw[j * d..(j + 1) * d].iter_mut().zip(hr).for_each(|(o, &hk)| *o += gj * hk);
                }
                if !db.is_empty() {
                    db[j] += gj;
                }
            }
        };
        rows_eval.evaluate(raw, Some(&mut accumulate))
    } else {
        rows_eval.evaluate(raw, None)
    };
    for (dest, acc) in [(grad_hidden, &dh), (grad_weight, &dw), (grad_bias, &db)] {
        if let Some(dest) = dest {
            dest.iter_mut().zip(acc).for_each(|(o, &a)| *o = a as f32);
        }
    }
    if matches!(mode, Mode::Backward { .. }) {
        return Ok(LossOutput::default());
    }
    let reduction = opts.get_reduction();
    let (loss, z_loss) = batch.reduce_with_z(out.sum, out.z_sum, reduction);
    Ok(LossOutput {
        loss,
        row_losses: (row_losses || reduction == Reduction::None)
            .then(|| out.losses.iter().map(|&l| l as f32).collect()),
        lse: lse.then(|| out.lses.iter().map(|&l| l as f32).collect()),
        z_loss: z_loss.filter(|_| opts.get_z_loss() > 0.0),
        metrics: opts.get_metrics().map(|spec| crate::Metrics::from_rows(spec, &out.metrics)),
        ..Default::default()
    })
}
