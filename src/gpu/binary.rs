//! Binary (multilabel) cross-entropy with logits on the GPU: the logits and targets are
//! streamed in flat pieces (the loss is elementwise, so a piece may cut a row), each
//! piece's losses tree-reduced on the device, then the pieces' sums.

use crate::error::Result;
use crate::options::{LossOptions, LossOutput, Reduction, Upstream};

use super::buffers::{Recorder, bind, groups_x};
use super::context::GpuContext;
use super::kernels::{BinaryParams, NO_INDEX};
use super::reduce::reduce_levels;
use super::workspace::BinaryWorkspace;

impl GpuContext {
    /// Binary (multilabel) cross-entropy with logits, as PyTorch's
    /// `binary_cross_entropy_with_logits`: `logits` and float `targets` (0/1 or soft) both
    /// [rows, classes]; [`LossOptions::weights`] and [`LossOptions::pos_weight`] per
    /// class; `mean` over N·V. For `none`, [`LossOutput::row_losses`] holds the [N, V]
    /// element losses. The gradient, when `grad` is given, is times `upstream` (a scalar,
    /// or one value per element); `backward` returns the gradient alone.
    pub(crate) fn binary(
        &self,
        logits: &[f32],
        classes: usize,
        targets: &[f32],
        grad: Option<&mut [f32]>,
        upstream: Upstream<'_>,
        backward: bool,
        opts: &LossOptions,
    ) -> Result<LossOutput> {
        crate::options::check_binary(logits.len(), targets.len(), classes, opts)?;
        let n = logits.len();
        let denom = match opts.get_reduction() {
            Reduction::Mean => opts.mean_denominator(n as f64),
            _ => 1.0,
        };
        let mut out = LossOutput {
            row_losses: (!backward && opts.wants_row_losses()).then(|| vec![0.0; n]),
            ..LossOutput::default()
        };
        let mut ws = self.workspace.lock().unwrap_or_else(|p| p.into_inner());
        let io = BinaryIo { grad, upstream };
        let total = self.scoped(|| {
            self.binary_pieces(&mut ws.binary, logits, classes, targets, io, opts, denom, &mut out)
        });
        if total.is_err() {
            ws.release();
        }
        let total = total?;
        if !backward && opts.get_reduction() != Reduction::None {
            out.loss = Some(total);
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn binary_pieces(
        &self,
        ws: &mut BinaryWorkspace,
        logits: &[f32],
        classes: usize,
        targets: &[f32],
        io: BinaryIo<'_>,
        opts: &LossOptions,
        denom: f64,
        out: &mut LossOutput,
    ) -> Result<f32> {
        let BinaryIo { mut grad, upstream } = io;
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
            ws.upstream.ensure(d, "xent bce upstream", st, bytes, bind_cap),
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
                        ws.upstream.get(),
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
        // 1: gradient, 2: element losses, 4: per-element upstream gradient.
        let per_element = matches!(upstream, Upstream::PerElement(_) | Upstream::PerRow(_));
        let flags = u32::from(grad.is_some())
            | (u32::from(out.row_losses.is_some()) << 1)
            | (u32::from(grad.is_some() && per_element) << 2);
        let scale = match upstream {
            Upstream::Scalar(g) => (1.0 / denom) as f32 * g,
            _ => (1.0 / denom) as f32,
        };
        let rb = ws.readback.get();
        for k in 0..pieces {
            let span = k * piece..((k + 1) * piece).min(n);
            let count = span.len();
            self.queue.write_buffer(ws.logits.get(), 0, bytemuck::cast_slice(&logits[span.clone()]));
            self.queue.write_buffer(ws.targets.get(), 0, bytemuck::cast_slice(&targets[span.clone()]));
            if let (Upstream::PerElement(g) | Upstream::PerRow(g), true) = (upstream, flags & 4 != 0) {
                self.queue.write_buffer(ws.upstream.get(), 0, bytemuck::cast_slice(&g[span.clone()]));
            }
            let wgs = count.div_ceil(per_group) as u64;
            let params = BinaryParams {
                count: count as u32,
                col_start: (span.start % classes) as u32,
                classes: classes as u32,
                groups_x: groups_x(wgs, max_dim),
                scale,
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
            if flags & 3 != 0 {
                let map = self.request_map(rb, 2 * bytes);
                let (g, l) = (&mut grad, &mut out.row_losses);
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

/// Where a binary evaluation's gradient goes, and its upstream gradient.
pub(crate) struct BinaryIo<'a> {
    grad: Option<&'a mut [f32]>,
    upstream: Upstream<'a>,
}
