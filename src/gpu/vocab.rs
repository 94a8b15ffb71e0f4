//! The GPU's half of [`crate::vocab`], on the host path: a shard's per-row partials and
//! its top-k counts through `row_partials.wgsl` — a workgroup per (row, block of
//! [`SPLIT_BLOCK_COLS`] columns), each writing one entry, read back and combined per row
//! on the host in column order — and its gradient columns through the saved-LSE backward
//! (`cross_entropy_backward.wgsl`) from the merged LSE. Both kernels take the shard's
//! column base with the whole vocabulary's V, Σ w and class weights, so a shard's
//! columns see the same rule as the whole row's.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::options::{Batch, LossOptions};
use crate::row_state::RowState;
use crate::vocab::{ColumnShard, VocabPartial};

use super::buffers::{Recorder, groups_x};
use super::context::GpuContext;
use super::kernels::{KernelOpts, NO_ENTRY, PartialParams};
use super::plan::{GradKind, Layout, Plan, SPLIT_BLOCK_COLS};
use super::ring::Ring;
use super::workspace::Workspace;

/// Bytes of one entry: three vec4 (row_partials.wgsl).
const ENTRY_BYTES: usize = 48;
/// `Seen::arg` when a block saw no maximum (row_state.wgsl's `NO_ARG`).
const NO_ARG: u32 = u32::MAX;

/// What a pass over a shard computes.
#[derive(Clone, Copy)]
enum Step<'a> {
    /// The partials, with the metrics' parts when asked.
    Partials { metrics: bool },
    /// The count above each row's target logit (from the merged partials).
    Above(&'a [Option<f32>]),
}

/// One readback: the chunk's rows and first column, and its entries a row.
struct Entries {
    rows: Range<usize>,
    col: usize,
    blocks: usize,
}

impl GpuContext {
    /// The shard's partials (checked by the caller against the whole problem's `batch`).
    pub(crate) fn vocab_partials_host(
        &self,
        shard: &ColumnShard<'_>,
        batch: &Batch,
        opts: &LossOptions,
    ) -> Result<Vec<VocabPartial>> {
        let step = Step::Partials { metrics: opts.get_metrics().is_some() };
        let mut out = vec![VocabPartial::EMPTY; batch.rows];
        self.vocab_pass(shard, batch, opts, step, |r, p, _| out[r] = out[r].combine(p))?;
        Ok(out)
    }

    /// The top-k step: each counted row's columns above its target's logit.
    pub(crate) fn vocab_above_host(
        &self,
        shard: &ColumnShard<'_>,
        batch: &Batch,
        target_logits: &[Option<f32>],
        opts: &LossOptions,
    ) -> Result<Vec<u64>> {
        let mut out = vec![0u64; batch.rows];
        self.vocab_pass(shard, batch, opts, Step::Above(target_logits), |r, _, above| out[r] += above)?;
        Ok(out)
    }

    /// One pass of `row_partials.wgsl` over the shard, each block's entry handed to
    /// `each(row, partial, above)` in column order.
    fn vocab_pass(
        &self,
        shard: &ColumnShard<'_>,
        batch: &Batch,
        opts: &LossOptions,
        step: Step<'_>,
        mut each: impl FnMut(usize, VocabPartial, u64),
    ) -> Result<()> {
        let width = shard.columns.len();
        if batch.rows == 0 || width == 0 {
            return Ok(());
        }
        let weights = opts.get_weights().map_or(0, <[f32]>::len);
        self.check_weights_bind(weights)?;
        self.planned(
            |limits| Plan::new(batch.rows, width, GradKind::Separate, limits),
            |ws, plan| {
                ws.entries_floor = (self.entry_rows(plan) * (blocks_of(plan) + 1) * ENTRY_BYTES) as u64;
                self.prepare(ws, plan, weights, None);
                ws.entries_floor = 0;
            },
            |ws, plan| self.vocab_chunks(ws, shard, batch, opts, step, &plan, &mut each),
        )
    }

    /// A class-weight vector longer than one binding cannot be bound (the kernels index
    /// it by the whole vocabulary's columns).
    pub(super) fn check_weights_bind(&self, weights: usize) -> Result<()> {
        let limit = self.plan_limits().max_binding;
        if weights as u64 * 4 > limit {
            return Err(Error::TooLarge {
                what: format!("class weights of {weights} classes"),
                needed: weights as u64 * 4,
                limit,
                hint: "the kernels bind the whole vocabulary's weights: use the CPU path at this size".into(),
            });
        }
        Ok(())
    }

    /// Rows of one dispatch: the plan's chunk, within one binding of entries and the
    /// workgroup limit.
    fn entry_rows(&self, plan: &Plan) -> usize {
        let per_row = blocks_of(plan) + 1;
        let limits = self.plan_limits();
        let by_binding = limits.max_binding as usize / (per_row * ENTRY_BYTES);
        let by_groups = (limits.max_workgroups_per_dim as usize).pow(2) / blocks_of(plan);
        plan.slot_rows.min(by_binding).min(by_groups).max(1)
    }

    #[allow(clippy::too_many_arguments)]
    fn vocab_chunks(
        &self,
        ws: &Workspace,
        shard: &ColumnShard<'_>,
        batch: &Batch,
        opts: &LossOptions,
        step: Step<'_>,
        plan: &Plan,
        each: &mut impl FnMut(usize, VocabPartial, u64),
    ) -> Result<()> {
        let groups = ws.groups.as_ref().expect("prepared");
        let (v, width) = (batch.classes, shard.columns.len());
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let kopts = KernelOpts::new(opts, v);
        let smoothing = opts.get_label_smoothing() > 0.0;
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(ws.weights.get(), 0, bytemuck::cast_slice(w));
        }
        let metrics = matches!(step, Step::Above(_) | Step::Partials { metrics: true });
        let mut ring = Ring::new(self, &ws.readback, ws.params.get(), plan.ring);
        let base = shard.columns.start;
        let mut read = |e: Entries, bytes: &[u8]| {
            let words: &[f32] = bytemuck::cast_slice(bytes);
            let stride = e.blocks + 1;
            for (i, r) in e.rows.clone().enumerate() {
                for b in 0..e.blocks {
                    let x = &words[(i * stride + b) * 12..(i * stride + b + 1) * 12];
                    let first = base + e.col + b * SPLIT_BLOCK_COLS;
                    each(r, entry_partial(x, first, smoothing, metrics), x[9] as u64);
                }
            }
        };
        let sub = self.entry_rows(plan);
        let mut zt_entries: Vec<f32> = Vec::new();
        for chunk in plan.chunks() {
            for start in chunk.rows.clone().step_by(sub) {
                let rows = start..(start + sub).min(chunk.rows.end);
                let cols = chunk.cols.clone();
                let blocks = cols.len().div_ceil(SPLIT_BLOCK_COLS);
                let stride = blocks + 1;
                let slot = ring.next_slot(&mut read)?;
                let elems = rows.start * width + cols.start..(rows.end - 1) * width + cols.end;
                self.queue.write_buffer(ws.logits.get(), 0, bytemuck::cast_slice(&shard.logits[elems]));
                self.queue.write_buffer(
                    ws.targets.get(),
                    0,
                    bytemuck::cast_slice(&batch.targets[rows.clone()]),
                );
                // Above: each row's target logit in the entry after its blocks, where the
                // kernel reads it when the target's column is not bound.
                let zt_entry = match step {
                    Step::Above(zt) => {
                        zt_entries.clear();
                        zt_entries.resize(rows.len() * stride * 12, 0.0);
                        for (i, r) in rows.clone().enumerate() {
                            zt_entries[(i * stride + blocks) * 12 + 2] = zt[r].unwrap_or(f32::MAX);
                        }
                        self.queue.write_buffer(ws.partials.get(), 0, bytemuck::cast_slice(&zt_entries));
                        blocks as u32
                    }
                    Step::Partials { .. } => NO_ENTRY,
                };
                let wgs = (rows.len() * blocks) as u64;
                let params = PartialParams {
                    rows: rows.len() as u32,
                    row_stride: cols.len() as u32,
                    cols: cols.len() as u32,
                    col_base: (base + cols.start) as u32,
                    block_cols: SPLIT_BLOCK_COLS as u32,
                    blocks: blocks as u32,
                    row_base: 0,
                    groups_x: groups_x(wgs, max_dim),
                    out_base: 0,
                    out_stride: stride as u32,
                    ignore_index: Batch::IGNORED,
                    classes: v as u32,
                    metrics: u32::from(metrics),
                    zt_entry,
                    ..bytemuck::Zeroable::zeroed()
                }
                .with_opts(&kopts);
                let mut rec = Recorder::new(&self.device, &self.limits);
                rec.dispatch(&self.kernels.partials, &groups.partials, &params, wgs);
                let bytes = (rows.len() * stride * ENTRY_BYTES) as u64;
                rec.copy(ws.partials.get(), 0, ring.readback(slot), 0, bytes);
                ring.submit(rec, slot, bytes, Entries { rows, col: cols.start, blocks });
            }
        }
        ring.drain(&mut read)
    }
}

/// The entry blocks of a plan's widest chunk.
fn blocks_of(plan: &Plan) -> usize {
    let cols = match plan.layout {
        Layout::Split { piece_cols, .. } => piece_cols,
        Layout::Rows { .. } => plan.classes,
    };
    cols.div_ceil(SPLIT_BLOCK_COLS).max(1)
}

/// One block's entry as a partial: (max, sum, target z, has target), (Σ w (max − z), Σ w),
/// (argmax column bits, count above, spread, NaN bits).
pub(super) fn entry_partial(x: &[f32], first_col: usize, smoothing: bool, metrics: bool) -> VocabPartial {
    let state = RowState { max: x[0], sum: x[1] };
    let mut p = VocabPartial { state, target: (x[3] != 0.0).then_some(x[2]), ..VocabPartial::EMPTY };
    if smoothing {
        p.smooth = f64::from(x[0]) * f64::from(x[5]) - f64::from(x[4]);
    }
    if metrics {
        let (arg, nan) = (x[8].to_bits(), x[11].to_bits() != 0);
        p.spread = if state.sum > 0.0 { f64::from(x[10]) } else { 0.0 };
        p.nan = nan;
        // A block of −inf has no maximum above the empty state's: its first column.
        p.argmax = Some(if arg == NO_ARG { (first_col, f32::NEG_INFINITY) } else { (arg as usize, x[0]) });
    }
    p
}
