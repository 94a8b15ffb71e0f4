//! The saved-LSE backward of class-index cross-entropy: the gradient from the logits and
//! the per-row LSE a forward saved, chunk by chunk as [`Plan`] says, through the ring of
//! readback slots, with the out-of-memory retry of every host call.

use std::ops::Range;

use crate::error::Result;
use crate::options::{Batch, LossOptions};

use super::buffers::{Recorder, groups_x};
use super::context::GpuContext;
use super::kernels::{BackwardParams, GradMode, KernelOpts};
use super::plan::{Chunk, GradKind, Layout, Plan, SPLIT_BLOCK_COLS};
use super::ring::Ring;
use super::stream::split_weights_error;
use super::workspace::Workspace;

impl GpuContext {
    /// The separate backward ([`crate::Mode::Backward`] of class indices): the gradient
    /// of the loss `opts` describes, from the logits and the per-row LSE a forward saved,
    /// times the upstream gradient, into `grad` — out of place, for callers that must
    /// keep their logits. One read of the logits and one write of the gradient, chunk by
    /// chunk as [`Plan`] says (rows longer than a binding in column pieces).
    ///
    /// The LSE is an f32 rounding of `max + log(sum)`: under offsets of 1e4 and more its
    /// absolute error shows in the gradient, as in any saved-LSE backward; the fused
    /// calls, which keep (max, sum), do not have that limit.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn cross_entropy_backward_into<'t>(
        &self,
        logits: &[f32],
        classes: usize,
        targets: impl Into<crate::Targets<'t>>,
        lse: &[f32],
        upstream: crate::Upstream<'_>,
        opts: &LossOptions,
        grad: &mut [f32],
    ) -> Result<()> {
        let batch = Batch::new(logits.len(), classes, targets.into(), opts)?;
        crate::cpu::reference::check_lse(lse, batch.rows)?;
        upstream.check(batch.rows)?;
        super::context::check_grad_len(grad.len(), logits.len())?;
        if batch.rows == 0 {
            return Ok(());
        }
        let weights = opts.get_weights().map_or(0, <[f32]>::len);
        self.planned(
            |limits| {
                let plan = Plan::new(batch.rows, batch.classes, GradKind::Separate, limits)?;
                if matches!(plan.layout, Layout::Split { .. }) && weights > 0 {
                    return Err(split_weights_error(self.path_name(), batch.classes));
                }
                Ok(plan)
            },
            |ws, plan| self.prepare(ws, plan, weights, None),
            |ws, plan| {
                self.backward_chunks(ws, (logits, 0), &batch, Stats::Lse(lse), upstream, opts, &plan, grad)
            },
        )
    }

    /// The separate backward over a shard of the vocabulary: the gradient of the shard's
    /// columns ([`crate::vocab`]) from the whole rows' merged (max, sum) states, the targets, options,
    /// V and Σ w of the whole problem (`batch`), into `grad` [rows, shard width].
    pub(crate) fn vocab_gradient_host(
        &self,
        shard: &crate::vocab::ColumnShard<'_>,
        batch: &Batch,
        states: &[crate::RowState],
        upstream: crate::Upstream<'_>,
        opts: &LossOptions,
        grad: &mut [f32],
    ) -> Result<()> {
        let width = shard.columns.len();
        if batch.rows == 0 || width == 0 {
            return Ok(());
        }
        let weights = opts.get_weights().map_or(0, <[f32]>::len);
        self.check_weights_bind(weights)?;
        self.planned(
            |limits| Plan::new(batch.rows, width, GradKind::Separate, limits),
            |ws, plan| self.prepare(ws, plan, weights, None),
            |ws, plan| {
                let logits = (shard.logits, shard.columns.start);
                self.backward_chunks(ws, logits, batch, Stats::States(states), upstream, opts, &plan, grad)
            },
        )
    }

    #[allow(clippy::too_many_arguments)]
    /// `logits`: the [rows, plan.classes] columns the plan covers and the whole
    /// vocabulary's column of their first (0 but for a vocabulary shard).
    fn backward_chunks(
        &self,
        ws: &Workspace,
        (logits, col_offset): (&[f32], usize),
        batch: &Batch,
        row_stats: Stats<'_>,
        upstream: crate::Upstream<'_>,
        opts: &LossOptions,
        plan: &Plan,
        grad: &mut [f32],
    ) -> Result<()> {
        let groups = ws.groups.as_ref().expect("prepared");
        let (v, width) = (batch.classes, plan.classes);
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let kopts = KernelOpts::new(opts, v).for_batch(batch, opts);
        let inv = batch.gradient_scale(opts.get_reduction());
        let (scale, per_row) = match upstream {
            crate::Upstream::Scalar(g) => (g * inv, 0),
            crate::Upstream::PerRow(_) | crate::Upstream::PerElement(_) => (inv, 1),
        };
        self.queue.write_buffer(ws.norm.get(), 0, bytemuck::cast_slice(&[1.0f32, 1.0]));
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(ws.weights.get(), 0, bytemuck::cast_slice(w));
        }
        let mut ring = Ring::new(self, &ws.readback, ws.params.get(), plan.ring);
        let mut copy = |elems: Range<usize>, bytes: &[u8]| {
            grad[elems.clone()].copy_from_slice(&bytemuck::cast_slice(bytes)[..elems.len()]);
        };
        // The rows' (max, sum) statistics, one chunk at a time: a saved LSE as (lse, 1).
        let mut stats: Vec<[f32; 2]> = Vec::with_capacity(plan.slot_rows);
        // A workgroup per (row, column block): a chunk's rows in dispatches of at most
        // max_groups workgroups (the plan's chunks are sized for the fused kernel, which
        // takes several rows a workgroup).
        let max_groups = (max_dim as usize).pow(2);
        let dispatches = plan.chunks().flat_map(|chunk| {
            let step = (max_groups / chunk.cols.len().div_ceil(SPLIT_BLOCK_COLS)).max(1);
            let rows = chunk.rows.clone();
            rows.clone()
                .step_by(step)
                .map(move |r| Chunk { rows: r..(r + step).min(rows.end), cols: chunk.cols.clone() })
        });
        for chunk in dispatches {
            let slot = ring.next_slot(&mut copy)?;
            let rows = chunk.rows.clone();
            let cols = chunk.cols.len();
            let elems = chunk.span(width);
            self.queue.write_buffer(ws.logits.get(), 0, bytemuck::cast_slice(&logits[elems.clone()]));
            self.queue.write_buffer(ws.targets.get(), 0, bytemuck::cast_slice(&batch.targets[rows.clone()]));
            stats.clear();
            match row_stats {
                Stats::Lse(lse) => stats.extend(lse[rows.clone()].iter().map(|&l| [l, 1.0])),
                Stats::States(st) => stats.extend(st[rows.clone()].iter().map(|s| [s.max, s.sum])),
            }
            self.queue.write_buffer(ws.row_stats.get(), 0, bytemuck::cast_slice(&stats));
            if let crate::Upstream::PerRow(g) = upstream {
                self.queue.write_buffer(ws.upstream.get(), 0, bytemuck::cast_slice(&g[rows.clone()]));
            }
            let blocks = cols.div_ceil(SPLIT_BLOCK_COLS);
            let wgs = (rows.len() * blocks) as u64;
            let params = BackwardParams {
                rows: rows.len() as u32,
                row_stride: cols as u32,
                cols: cols as u32,
                col_base: (col_offset + chunk.cols.start) as u32,
                block_cols: SPLIT_BLOCK_COLS as u32,
                blocks: blocks as u32,
                row_base: 0,
                groups_x: groups_x(wgs, max_dim),
                scale,
                grad_mode: GradMode::Separate as u32,
                ignore_index: Batch::IGNORED,
                classes: v as u32,
                per_row,
                ..bytemuck::Zeroable::zeroed()
            }
            .with_opts(&kopts);
            let mut rec = Recorder::new(&self.device, &self.limits);
            rec.dispatch(&self.kernels.backward, &groups.backward, &params, wgs);
            let bytes = elems.len() as u64 * 4;
            rec.copy(ws.grad.get(), 0, ring.readback(slot), 0, bytes);
            ring.submit(rec, slot, bytes, elems);
        }
        ring.drain(&mut copy)
    }
}

/// The row statistics a backward divides by.
#[derive(Clone, Copy)]
enum Stats<'a> {
    /// A saved LSE per row.
    Lse(&'a [f32]),
    /// Merged (max, sum) states per row (vocabulary shards).
    States(&'a [crate::RowState]),
}
