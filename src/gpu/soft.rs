//! Cross-entropy with probability (soft) targets on the GPU: chunks of whole rows (logits
//! and targets), one workgroup per row, per-chunk loss sums tree-reduced on the device.

use crate::error::{Error, Result};
use crate::options::{LossOptions, LossOutput, Reduction, Upstream};
use crate::problem::Mode;

use super::buffers::{Recorder, bind, groups_x};
use super::context::GpuContext;
use super::kernels::{KernelOpts, NO_INDEX, SoftParams};
use super::reduce::reduce_levels;
use super::workspace::SoftWorkspace;

/// A soft-target evaluation's inputs beyond the logits and targets.
pub(crate) struct SoftRun<'a> {
    /// Fused, or a separate backward from a saved LSE.
    pub mode: Mode<'a>,
    /// Where the gradient goes (none: the loss only).
    pub grad: Option<&'a mut [f32]>,
}

impl GpuContext {
    /// Cross-entropy with probability (soft) targets [rows, classes], as PyTorch's
    /// `cross_entropy` with float targets: label smoothing applies to the targets, class
    /// weights per class, `mean` divides by the number of rows (or `n_items`), and
    /// `ignore_index` does not apply. As a separate backward, the saved LSE replaces the
    /// row's own and only the gradient is written, times the upstream gradient.
    pub(crate) fn soft(
        &self,
        logits: &[f32],
        classes: usize,
        targets: &[f32],
        run: SoftRun<'_>,
        opts: &LossOptions,
    ) -> Result<LossOutput> {
        let (denom, rows) = crate::options::check_soft(logits.len(), targets.len(), classes, opts)?;
        let reduction = opts.get_reduction();
        let d = if reduction == Reduction::Mean { denom } else { 1.0 };
        let backward = matches!(run.mode, Mode::Backward { .. });
        let mut out = LossOutput {
            row_losses: (!backward && opts.wants_row_losses()).then(|| vec![0.0; rows]),
            lse: Some(vec![0.0; rows]),
            ..LossOutput::default()
        };
        let mut ws = self.workspace.lock().unwrap_or_else(|p| p.into_inner());
        let total =
            self.scoped(|| self.soft_chunks(&mut ws.soft, logits, classes, targets, run, opts, d, &mut out));
        if total.is_err() {
            ws.release();
        }
        let total = total?;
        let lse = out.lse.take().unwrap_or_default();
        if backward {
            return Ok(LossOutput::default());
        }
        if reduction != Reduction::None {
            out.loss = Some(total);
            let s = opts.get_z_loss();
            if s > 0.0 {
                let z: f64 = lse.iter().map(|&l| s * f64::from(l) * f64::from(l)).sum();
                out.z_loss = Some((z / d) as f32);
            }
        }
        out.lse = opts.wants_lse().then_some(lse);
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn soft_chunks(
        &self,
        ws: &mut SoftWorkspace,
        logits: &[f32],
        v: usize,
        targets: &[f32],
        run: SoftRun<'_>,
        opts: &LossOptions,
        d: f64,
        out: &mut LossOutput,
    ) -> Result<f32> {
        let SoftRun { mode, mut grad } = run;
        let (saved, upstream) = match mode {
            Mode::Fused => (None, Upstream::Scalar(1.0)),
            Mode::Backward { lse, upstream } => (lse, upstream),
        };
        use wgpu::BufferUsages as U;
        let dev = &self.device;
        let n = logits.len() / v;
        let wg = self.kernels.workgroup_size;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let bind_cap = self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size);
        let row_bytes = v as u64 * 4;
        // Four buffers of a chunk's size: logits, targets, gradient, readback.
        let rows_per_chunk =
            (bind_cap / row_bytes).min(self.budget / (4 * row_bytes + 64)).min(n as u64) as usize;
        if rows_per_chunk == 0 {
            return Err(Error::Unsupported {
                path: self.path_name(),
                cell: "probability targets in rows longer than one storage binding".into(),
                why: format!(
                    "a row of {v} classes is larger than one binding ({bind_cap} bytes) and the probability \
                     kernel does not split rows; use the CPU path at this size"
                ),
            });
        }
        let chunks = n.div_ceil(rows_per_chunk);
        let chunk_bytes = rows_per_chunk as u64 * row_bytes;
        let scratch_levels = reduce_levels(rows_per_chunk as u64, 0, wg, max_dim, 1.0, NO_INDEX);
        let sum_levels = reduce_levels(chunks as u64, 0, wg, max_dim, d as f32, NO_INDEX);
        let st = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        let stride = super::buffers::params_stride(&self.limits);
        let rows_out = rows_per_chunk as u64 * 4;
        let changed = [
            ws.logits.ensure(dev, "xent soft logits", st, chunk_bytes, bind_cap),
            ws.probs.ensure(dev, "xent soft targets", st, chunk_bytes, bind_cap),
            ws.row_loss.ensure(dev, "xent soft row_loss", st, rows_out, bind_cap),
            ws.row_lse.ensure(dev, "xent soft row_lse", st, rows_out, bind_cap),
            ws.grad.ensure(dev, "xent soft grad", st, chunk_bytes, bind_cap),
            ws.weights.ensure(dev, "xent soft weights", st, row_bytes, bind_cap),
            ws.upstream.ensure(dev, "xent soft upstream", st, rows_out, bind_cap),
            ws.scratch.ensure(dev, "xent soft scratch", st, scratch_levels.extent * 4, bind_cap),
            ws.sums.ensure(dev, "xent soft sums", st, sum_levels.extent * 4, bind_cap),
            ws.params.ensure(dev, "xent soft params", U::UNIFORM | U::COPY_DST, stride * 16, u64::MAX),
            ws.readback.ensure(
                dev,
                "xent soft readback",
                U::MAP_READ | U::COPY_DST,
                chunk_bytes + 2 * rows_out + 16,
                u64::MAX,
            ),
        ];
        if ws.groups.is_none() || changed.contains(&true) {
            let k = &self.kernels;
            let p = ws.params.get();
            ws.groups = Some([
                bind(
                    dev,
                    &k.soft,
                    p,
                    &[
                        ws.logits.get(),
                        ws.probs.get(),
                        ws.row_loss.get(),
                        ws.row_lse.get(),
                        ws.grad.get(),
                        ws.weights.get(),
                        ws.upstream.get(),
                    ],
                ),
                bind(dev, &k.reduce, p, &[ws.scratch.get()]),
                bind(dev, &k.reduce, p, &[ws.sums.get()]),
            ]);
        }
        let ws = &*ws;
        let [soft_bg, scratch_bg, sums_bg] = ws.groups.as_ref().expect("bound");
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(ws.weights.get(), 0, bytemuck::cast_slice(w));
        }
        let k = KernelOpts::new(opts, v);
        let rb = ws.readback.get();
        let (loss_at, lse_at) = (chunk_bytes, chunk_bytes + rows_out);
        for c in 0..chunks {
            let r0 = c * rows_per_chunk;
            let rows = rows_per_chunk.min(n - r0);
            let span = r0 * v..(r0 + rows) * v;
            self.queue.write_buffer(ws.logits.get(), 0, bytemuck::cast_slice(&logits[span.clone()]));
            self.queue.write_buffer(ws.probs.get(), 0, bytemuck::cast_slice(&targets[span.clone()]));
            // Flags of cross_entropy_soft.wgsl: gradient, saved LSE, per-row upstream.
            let mut flags = u32::from(grad.is_some());
            if let Some(saved) = saved {
                flags |= 2;
                self.queue.write_buffer(ws.row_lse.get(), 0, bytemuck::cast_slice(&saved[r0..r0 + rows]));
            }
            let mut scale = (1.0 / d) as f32;
            match upstream {
                Upstream::Scalar(g) => scale *= g,
                Upstream::PerRow(g) | Upstream::PerElement(g) => {
                    flags |= 4;
                    self.queue.write_buffer(ws.upstream.get(), 0, bytemuck::cast_slice(&g[r0..r0 + rows]));
                }
            }
            let params = SoftParams {
                rows: rows as u32,
                classes: v as u32,
                groups_x: groups_x(rows as u64, max_dim),
                flags,
                has_weights: k.has_weights,
                grad_scale: scale,
                logit_scale: k.logit_scale,
                softcap: k.softcap,
                smoothing: k.smoothing,
                z_loss: k.z_loss,
                weight_total: k.weight_total,
                _pad: 0,
            };
            let mut rec = Recorder::new(dev, &self.limits);
            rec.dispatch(&self.kernels.soft, soft_bg, &params, rows as u64);
            rec.copy(ws.row_loss.get(), 0, ws.scratch.get(), 0, rows as u64 * 4);
            let levels = reduce_levels(rows as u64, 0, wg, max_dim, 1.0, NO_INDEX);
            levels.record(&mut rec, &self.kernels, scratch_bg);
            rec.copy(ws.scratch.get(), u64::from(levels.result) * 4, ws.sums.get(), c as u64 * 4, 4);
            if grad.is_some() {
                rec.copy(ws.grad.get(), 0, rb, 0, span.len() as u64 * 4);
            }
            rec.copy(ws.row_loss.get(), 0, rb, loss_at, rows as u64 * 4);
            rec.copy(ws.row_lse.get(), 0, rb, lse_at, rows as u64 * 4);
            let submission = rec.submit(&self.queue, ws.params.get());
            let map = self.request_map(rb, lse_at + rows_out);
            let (g, l, e) = (&mut grad, &mut out.row_losses, &mut out.lse);
            self.finish_map(rb, map, Some(submission), |b| {
                let f: &[f32] = bytemuck::cast_slice(b);
                if let Some(g) = g {
                    g[span.clone()].copy_from_slice(&f[..span.len()]);
                }
                let (la, ea) = ((loss_at / 4) as usize, (lse_at / 4) as usize);
                if let Some(l) = l {
                    l[r0..r0 + rows].copy_from_slice(&f[la..la + rows]);
                }
                if let Some(e) = e {
                    e[r0..r0 + rows].copy_from_slice(&f[ea..ea + rows]);
                }
            })?;
        }
        self.reduce_sums(ws.sums.get(), sums_bg, chunks as u64, d as f32, ws.params.get(), rb)
    }
}
