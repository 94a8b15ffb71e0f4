//! Binary (multilabel) cross-entropy with logits on the GPU: the logits and targets are
//! streamed in the chunks [`Plan`] gives elementwise losses (whole rows, or pieces of rows
//! longer than a binding), through the ring of readback slots; each chunk's losses
//! tree-reduced on the device, then the chunks' sums.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::options::{LossOptions, LossOutput, Reduction, Upstream};

use super::buffers::{Grow, Recorder, bind, groups_x};
use super::context::GpuContext;
use super::kernels::{BINARY_GRAD, BINARY_LOSSES, BINARY_UPSTREAM, BinaryParams, Kernels, NO_INDEX};
use super::plan::{Plan, Streamed};
use super::reduce::reduce_levels;
use super::ring::{MAX_PARAM_BLOCKS, Ring};
use super::workspace::{BinaryWorkspace, Workspace};

/// What a binary call streams besides the logits and targets.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    classes: usize,
    grad: bool,
    /// The element losses (`none`).
    losses: bool,
    /// A per-element upstream gradient.
    per_element: bool,
    /// The loss over the chunks.
    total: bool,
    weights: bool,
    pos_weight: bool,
}

impl Shape {
    /// What a binary evaluation computes (the device-resident path's shape).
    pub(crate) fn new(
        classes: usize,
        grad: bool,
        losses: bool,
        per_element: bool,
        weights: bool,
        pos_weight: bool,
    ) -> Self {
        Self { classes, grad, losses, per_element, total: true, weights, pos_weight }
    }

    /// The `BINARY_*` flags of `binary_cross_entropy.wgsl`.
    pub(crate) fn flags(self) -> u32 {
        let mut flags = 0;
        if self.grad {
            flags |= BINARY_GRAD;
        }
        if self.losses {
            flags |= BINARY_LOSSES;
        }
        if self.per_element {
            flags |= BINARY_UPSTREAM;
        }
        flags
    }

    fn streamed(self) -> Streamed {
        Streamed::Binary {
            inputs: 2 + u32::from(self.per_element),
            outputs: u32::from(self.grad) + u32::from(self.losses),
        }
    }

    /// Where the element losses sit in a readback slot (after the gradient).
    fn losses_at(self, plan: &Plan) -> u64 {
        if self.grad { (plan.chunk_elems as u64 * 4).next_multiple_of(16) } else { 0 }
    }

    fn readback_bytes(self, plan: &Plan) -> u64 {
        self.losses_at(plan) + if self.losses { plan.chunk_elems as u64 * 4 } else { 0 }
    }
}

impl GpuContext {
    /// Binary (multilabel) cross-entropy with logits, as PyTorch's
    /// `binary_cross_entropy_with_logits`: `logits` and float `targets` (0/1 or soft) both
    /// [rows, classes]; [`LossOptions::weights`] and [`LossOptions::pos_weight`] per
    /// class; `mean` over N·V. For `none`, [`LossOutput::row_losses`] holds the [N, V]
    /// element losses. The gradient, when `grad` is given, is times `upstream` (a scalar,
    /// or one value per element); `backward` returns the gradient alone.
    #[allow(clippy::too_many_arguments)]
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
        let rows = crate::options::check_binary(logits.len(), targets.len(), classes, opts)?;
        let n = logits.len();
        let denom = match opts.get_reduction() {
            Reduction::Mean => opts.mean_denominator(n as f64),
            _ => 1.0,
        };
        let shape = Shape {
            classes,
            grad: grad.is_some(),
            losses: !backward && opts.wants_row_losses(),
            per_element: grad.is_some() && matches!(upstream, Upstream::PerElement(_) | Upstream::PerRow(_)),
            total: !backward && opts.get_reduction() != Reduction::None,
            weights: opts.get_weights().is_some(),
            pos_weight: opts.get_pos_weight().is_some(),
        };
        let max_binding = self.plan_limits().max_binding;
        if (shape.weights || shape.pos_weight) && classes as u64 * 4 > max_binding {
            return Err(Error::Unsupported {
                path: self.path_name(),
                cell: "binary class weights in rows longer than one storage binding".into(),
                why: format!(
                    "rows of {classes} classes are cut into pieces, and their weights and pos_weight \
                     ({classes} values each) do not fit one binding ({max_binding} bytes) either; use the \
                     CPU path for class weights at this size"
                ),
            });
        }
        let mut out = LossOutput { row_losses: shape.losses.then(|| vec![0.0; n]), ..LossOutput::default() };
        let total = if rows == 0 {
            (0.0 / denom) as f32
        } else {
            let io = BinaryIo { grad, upstream };
            self.planned(
                |limits| Plan::streaming(rows, classes, shape.streamed(), limits),
                |ws, plan| self.prepare_binary(ws, plan, shape),
                |ws, plan| {
                    self.binary_chunks(&ws.binary, &plan, logits, targets, io, opts, shape, denom, &mut out)
                },
            )?
        };
        if shape.total {
            out.loss = Some(total);
        }
        Ok(out)
    }

    /// Makes the binary buffers big enough for `plan`, rebuilding the bind groups only
    /// when a buffer was replaced.
    fn prepare_binary(&self, ws: &mut Workspace, plan: &Plan, shape: Shape) {
        let d = &self.device;
        let wg = self.kernels.workgroup_size;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let bytes = plan.chunk_elems as u64 * 4;
        let elems_or_16 = |on: bool| if on { bytes } else { 16 };
        let class_bytes = |on: bool| if on { shape.classes as u64 * 4 } else { 16 };
        let groups = (plan.chunk_elems as u64).div_ceil(4 * u64::from(wg));
        let partials = reduce_levels(groups, 0, wg, max_dim, 1.0, NO_INDEX).extent * 4;
        let sums = reduce_levels(plan.chunk_sums() as u64, 0, wg, max_dim, 1.0, NO_INDEX).extent * 4;
        let b: &mut BinaryWorkspace = &mut ws.binary;
        let mut grow = Grow::new(d, &self.limits, MAX_PARAM_BLOCKS);
        grow.storage(&mut b.logits, "xent bce logits", bytes);
        grow.storage(&mut b.targets, "xent bce targets", bytes);
        grow.storage(&mut b.weights, "xent bce weights", class_bytes(shape.weights));
        grow.storage(&mut b.pos_weight, "xent bce pos_weight", class_bytes(shape.pos_weight));
        grow.storage(&mut b.grad, "xent bce grad", elems_or_16(shape.grad));
        grow.storage(&mut b.losses, "xent bce losses", elems_or_16(shape.losses));
        grow.storage(&mut b.partials, "xent bce partials", partials);
        grow.storage(&mut b.upstream, "xent bce upstream", elems_or_16(shape.per_element));
        grow.storage(&mut b.sums, "xent bce sums", sums);
        grow.params(&mut b.params, "xent bce params");
        grow.readback(&mut b.readback, plan.ring, "xent bce readback", shape.readback_bytes(plan));
        let created = grow.created();
        if b.groups.is_none() || created > 0 {
            let k = &self.kernels;
            let p = b.params.get();
            b.groups = Some([
                bind(
                    d,
                    &k.binary,
                    p,
                    &[
                        b.logits.get(),
                        b.targets.get(),
                        b.weights.get(),
                        b.pos_weight.get(),
                        b.grad.get(),
                        b.losses.get(),
                        b.partials.get(),
                        b.upstream.get(),
                    ],
                ),
                bind(d, &k.reduce, p, &[b.partials.get()]),
                bind(d, &k.reduce, p, &[b.sums.get()]),
            ]);
        }
        ws.allocations += created;
    }

    /// Streams the chunks of `plan`; returns the loss over them (NaN when not wanted).
    #[allow(clippy::too_many_arguments)]
    fn binary_chunks(
        &self,
        ws: &BinaryWorkspace,
        plan: &Plan,
        logits: &[f32],
        targets: &[f32],
        io: BinaryIo<'_>,
        opts: &LossOptions,
        shape: Shape,
        denom: f64,
        out: &mut LossOutput,
    ) -> Result<f32> {
        let BinaryIo { mut grad, upstream } = io;
        let classes = plan.classes;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let [bce_bg, partials_bg, sums_bg] = ws.groups.as_ref().expect("prepared");
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(ws.weights.get(), 0, bytemuck::cast_slice(w));
        }
        if let Some(w) = opts.get_pos_weight() {
            self.queue.write_buffer(ws.pos_weight.get(), 0, bytemuck::cast_slice(w));
        }
        let flags = shape.flags();
        let scale = match upstream {
            Upstream::Scalar(g) => (1.0 / denom) as f32 * g,
            _ => (1.0 / denom) as f32,
        };
        let losses_at = shape.losses_at(plan);
        let mut ring = Ring::new(self, &ws.readback, ws.params.get(), plan.ring);
        // Copies a finished chunk's elements out of its readback.
        let mut copy = |span: Range<usize>, bytes: &[u8]| {
            let f: &[f32] = bytemuck::cast_slice(&bytes[..bytes.len() / 4 * 4]);
            if let Some(g) = grad.as_deref_mut() {
                g[span.clone()].copy_from_slice(&f[..span.len()]);
            }
            if let Some(l) = &mut out.row_losses {
                let at = (losses_at / 4) as usize;
                l[span.clone()].copy_from_slice(&f[at..at + span.len()]);
            }
        };
        for (c, chunk) in plan.chunks().enumerate() {
            let slot = ring.next_slot(&mut copy)?;
            let span = chunk.span(classes);
            let count = span.len();
            self.queue.write_buffer(ws.logits.get(), 0, bytemuck::cast_slice(&logits[span.clone()]));
            self.queue.write_buffer(ws.targets.get(), 0, bytemuck::cast_slice(&targets[span.clone()]));
            if let (Upstream::PerElement(g) | Upstream::PerRow(g), true) = (upstream, shape.per_element) {
                self.queue.write_buffer(ws.upstream.get(), 0, bytemuck::cast_slice(&g[span.clone()]));
            }
            let piece = BinaryPiece { count, col_start: span.start % classes, flags, scale };
            let mut rec = Recorder::new(&self.device, &self.limits);
            let sum =
                record_binary_piece(&mut rec, &self.kernels, [bce_bg, partials_bg], piece, shape, max_dim);
            if let Some(sum) = sum {
                rec.copy(ws.partials.get(), u64::from(sum) * 4, ws.sums.get(), c as u64 * 4, 4);
            }
            let rb = ring.readback(slot);
            let bytes = count as u64 * 4;
            let mut map = 0;
            if shape.grad {
                map = bytes;
                rec.copy(ws.grad.get(), 0, rb, 0, bytes);
            }
            if shape.losses {
                map = losses_at + bytes;
                rec.copy(ws.losses.get(), 0, rb, losses_at, bytes);
            }
            ring.submit(rec, slot, map, span);
        }
        ring.drain(&mut copy)?;
        if !shape.total {
            return Ok(f32::NAN);
        }
        let count = plan.chunk_sums() as u64;
        self.reduce_sums(ws.sums.get(), sums_bg, count, denom as f32, ws.params.get(), ring.readback(0))
    }
}

/// Where a binary evaluation's gradient goes, and its upstream gradient.
pub(crate) struct BinaryIo<'a> {
    grad: Option<&'a mut [f32]>,
    upstream: Upstream<'a>,
}

/// One flat piece of the [N, V] logits for `binary_cross_entropy.wgsl`.
pub(crate) struct BinaryPiece {
    /// Elements.
    pub count: usize,
    /// Class of the first element.
    pub col_start: usize,
    /// `BINARY_*` flags.
    pub flags: u32,
    /// The gradient's scale.
    pub scale: f32,
}

/// Records the binary kernel over one piece (bound by `bce_bg`) and, when the shape wants
/// the total, the tree sum of its workgroups' partial sums (bound by `partials_bg`);
/// returns the element of the partials buffer that holds the piece's sum. Shared by the host stream and the device-resident
/// path.
pub(crate) fn record_binary_piece(
    rec: &mut Recorder<'_>,
    kernels: &Kernels,
    [bce_bg, partials_bg]: [&wgpu::BindGroup; 2],
    piece: BinaryPiece,
    shape: Shape,
    max_dim: u32,
) -> Option<u32> {
    let wg = kernels.workgroup_size;
    let wgs = piece.count.div_ceil(4 * wg as usize) as u64;
    let params = BinaryParams {
        count: piece.count as u32,
        col_start: piece.col_start as u32,
        classes: shape.classes.max(1) as u32,
        groups_x: groups_x(wgs, max_dim),
        scale: piece.scale,
        has_weights: u32::from(shape.weights),
        has_pos_weight: u32::from(shape.pos_weight),
        flags: piece.flags,
    };
    rec.dispatch(&kernels.binary, bce_bg, &params, wgs);
    shape.total.then(|| {
        let levels = reduce_levels(wgs, 0, wg, max_dim, 1.0, NO_INDEX);
        levels.record(rec, kernels, partials_bg);
        levels.result
    })
}
