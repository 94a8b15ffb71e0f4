//! Binary (multilabel) cross-entropy with logits on the GPU: the logits and targets are
//! streamed in flat pieces (the loss is elementwise, so a piece may cut a row), each
//! piece's losses tree-reduced on the device, then the pieces' sums.

use crate::error::Result;
use crate::options::{LossOptions, LossOutput, Reduction};

use super::buffers::{Recorder, Slot, bind, groups_x};
use super::context::GpuContext;
use super::kernels::{BinaryParams, NO_INDEX};
use super::stream::reduce_levels;

/// Buffers of the binary path, reused across calls.
#[derive(Default)]
pub(crate) struct BinaryWorkspace {
    logits: Slot,
    targets: Slot,
    weights: Slot,
    pos_weight: Slot,
    grad: Slot,
    losses: Slot,
    partials: Slot,
    sums: Slot,
    params: Slot,
    readback: Slot,
    groups: Option<(wgpu::BindGroup, wgpu::BindGroup, wgpu::BindGroup)>,
}

impl GpuContext {
    /// Binary (multilabel) cross-entropy with logits, as PyTorch's
    /// `binary_cross_entropy_with_logits`: `logits` and float `targets` (0/1 or soft) both
    /// [rows, classes]; [`LossOptions::weights`] and [`LossOptions::pos_weight`] per
    /// class; `mean` over N·V. For `none`, [`LossOutput::row_losses`] holds the [N, V]
    /// element losses.
    pub fn binary_cross_entropy(
        &self,
        logits: &[f32],
        classes: usize,
        targets: &[f32],
        opts: &LossOptions,
    ) -> Result<LossOutput> {
        let rows = crate::options::check_binary(logits.len(), targets.len(), classes, opts)?;
        let n = logits.len();
        let denom = match opts.get_reduction() {
            Reduction::Mean => opts.get_n_items().unwrap_or(n as f64),
            _ => 1.0,
        };
        let want_losses = opts.wants_row_losses();
        let mut out = LossOutput {
            loss: None,
            row_losses: want_losses.then(|| vec![0.0; n]),
            lse: None,
            gradient: opts.wants_gradient().then(|| vec![0.0; n]),
        };
        if n == 0 {
            out.loss = (opts.get_reduction() != Reduction::None).then(|| (0.0 / denom) as f32);
            return Ok(out);
        }
        let _ = rows;
        let mut ws = self.workspace.lock().unwrap_or_else(|p| p.into_inner());
        let total = self
            .scoped(|| self.binary_pieces(&mut ws.binary, logits, classes, targets, opts, denom, &mut out));
        if total.is_err() {
            ws.release();
        }
        let total = total?;
        out.loss = (opts.get_reduction() != Reduction::None).then_some(total);
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn binary_pieces(
        &self,
        ws: &mut BinaryWorkspace,
        logits: &[f32],
        classes: usize,
        targets: &[f32],
        opts: &LossOptions,
        denom: f64,
        out: &mut LossOutput,
    ) -> Result<f32> {
        use wgpu::BufferUsages as U;
        let d = &self.device;
        let n = logits.len();
        let wg = self.kernels.workgroup_size;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let bind_cap = self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size);
        // Five buffers of a piece's size (logits, targets, gradient, losses, readback).
        let piece = ((bind_cap / 4).min(self.budget / 20) as usize).max(64).min(n);
        let pieces = n.div_ceil(piece);
        let per_group = 4 * wg as usize;
        let groups = piece.div_ceil(per_group) as u64;
        let piece_levels = reduce_levels(groups, 0, wg, max_dim, 1.0, NO_INDEX);
        let sum_levels = reduce_levels(pieces as u64, 0, wg, max_dim, denom as f32, NO_INDEX);
        let st = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        let stride = super::buffers::params_stride(&self.limits);
        let bytes = piece as u64 * 4;
        let changed = [
            ws.logits.ensure(d, "xent bce logits", st, bytes, bind_cap),
            ws.targets.ensure(d, "xent bce targets", st, bytes, bind_cap),
            ws.weights.ensure(d, "xent bce weights", st, classes as u64 * 4, bind_cap),
            ws.pos_weight.ensure(d, "xent bce pos_weight", st, classes as u64 * 4, bind_cap),
            ws.grad.ensure(d, "xent bce grad", st, bytes, bind_cap),
            ws.losses.ensure(d, "xent bce losses", st, bytes, bind_cap),
            ws.partials.ensure(d, "xent bce partials", st, piece_levels.extent * 4, bind_cap),
            ws.sums.ensure(d, "xent bce sums", st, sum_levels.extent * 4, bind_cap),
            ws.params.ensure(d, "xent bce params", U::UNIFORM | U::COPY_DST, stride * 16, u64::MAX),
            ws.readback.ensure(d, "xent bce readback", U::MAP_READ | U::COPY_DST, 2 * bytes, u64::MAX),
        ];
        if ws.groups.is_none() || changed.contains(&true) {
            let k = &self.kernels;
            let p = ws.params.get();
            ws.groups = Some((
                bind(
                    d,
                    &k.binary,
                    p,
                    &[
                        ws.logits.get(),
                        ws.targets.get(),
                        ws.weights.get(),
                        ws.pos_weight.get(),
                        ws.grad.get(),
                        ws.losses.get(),
                        ws.partials.get(),
                    ],
                ),
                bind(d, &k.reduce, p, &[ws.partials.get()]),
                bind(d, &k.reduce, p, &[ws.sums.get()]),
            ));
        }
        let ws = &*ws;
        let (bce_bg, partials_bg, sums_bg) = ws.groups.as_ref().expect("bound");
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(ws.weights.get(), 0, bytemuck::cast_slice(w));
        }
        if let Some(w) = opts.get_pos_weight() {
            self.queue.write_buffer(ws.pos_weight.get(), 0, bytemuck::cast_slice(w));
        }
        let flags = u32::from(out.gradient.is_some()) | (u32::from(out.row_losses.is_some()) << 1);
        let rb = ws.readback.get();
        for k in 0..pieces {
            let span = k * piece..((k + 1) * piece).min(n);
            let count = span.len();
            self.queue.write_buffer(ws.logits.get(), 0, bytemuck::cast_slice(&logits[span.clone()]));
            self.queue.write_buffer(ws.targets.get(), 0, bytemuck::cast_slice(&targets[span.clone()]));
            let wgs = count.div_ceil(per_group) as u64;
            let params = BinaryParams {
                count: count as u32,
                col_start: (span.start % classes) as u32,
                classes: classes as u32,
                groups_x: groups_x(wgs, max_dim),
                scale: (1.0 / denom) as f32,
                has_weights: u32::from(opts.get_weights().is_some()),
                has_pos_weight: u32::from(opts.get_pos_weight().is_some()),
                flags,
            };
            let mut rec = Recorder::new(d, &self.limits);
            rec.dispatch(&self.kernels.binary, bce_bg, &params, wgs);
            let levels = reduce_levels(wgs, 0, wg, max_dim, 1.0, NO_INDEX);
            levels.record(&mut rec, &self.kernels, partials_bg);
            rec.copy(ws.partials.get(), u64::from(levels.result) * 4, ws.sums.get(), k as u64 * 4, 4);
            let piece_bytes = count as u64 * 4;
            if flags & 1 != 0 {
                rec.copy(ws.grad.get(), 0, rb, 0, piece_bytes);
            }
            if flags & 2 != 0 {
                rec.copy(ws.losses.get(), 0, rb, bytes, piece_bytes);
            }
            let submission = rec.submit(&self.queue, ws.params.get());
            if flags != 0 {
                let map = self.request_map(rb, 2 * bytes);
                let (g, l) = (&mut out.gradient, &mut out.row_losses);
                self.finish_map(rb, map, Some(submission), |b| {
                    let f: &[f32] = bytemuck::cast_slice(b);
                    if let Some(g) = g {
                        g[span.clone()].copy_from_slice(&f[..count]);
                    }
                    if let Some(l) = l {
                        l[span.clone()].copy_from_slice(&f[piece..piece + count]);
                    }
                })?;
            }
        }
        self.reduce_sums(ws.sums.get(), sums_bg, pieces as u64, denom as f32, ws.params.get(), rb)
    }
}
