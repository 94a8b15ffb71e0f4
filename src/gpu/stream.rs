//! The host-array driver of class-index targets: streams a problem that lives in host
//! memory through the device, chunk by chunk as [`Plan`] says, with a bounded number of
//! chunks in flight ([`Ring`]). Per-chunk loss sums are tree-reduced on the device, then
//! reduced again over the chunks, so the result depends only on the plan and is
//! bit-identical run to run.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::metrics::{MetricSums, Metrics, MetricsSpec, RowMetrics};

use super::metrics::{RECORD_BYTES, metric_levels};
use crate::options::{Batch, LossOptions, LossOutput, Reduction};

use super::buffers::{Grow, Recorder, bind, groups_x};
use super::context::GpuContext;
use super::grid::{RowGrid, record_row_grid};
use super::kernels::{
    BackwardParams, ElemFormat, F_METRICS, GradMode, KernelOpts, MergeParams, NO_ENTRY, NO_INDEX,
    PartialParams, RowParams,
};
use super::plan::{GradKind, Layout, Plan, PlanLimits, SPLIT_BLOCK_COLS};
use super::reduce::reduce_levels;
use super::ring::{MAX_PARAM_BLOCKS, Ring};
use super::workspace::{BindGroups, Workspace};

/// Logits as the caller holds them.
#[derive(Clone, Copy)]
pub(crate) enum Data<'a> {
    F32(&'a [f32]),
    Half(&'a [u16], crate::HalfFormat),
}

/// A gradient destination: f32, or 16-bit in the logits' format.
pub(crate) enum GradOut<'a> {
    F32(&'a mut [f32]),
    Half(&'a mut [u16]),
}

/// Where the logits come from and where the gradient goes.
pub(crate) enum Io<'a> {
    Loss(Data<'a>),
    Separate(Data<'a>, GradOut<'a>),
    /// The gradient over the logits, in their own format.
    InPlace(GradOut<'a>, Option<crate::HalfFormat>),
}

impl Io<'_> {
    /// Bytes of the logits' elements in `range`.
    fn logit_bytes(&self, range: std::ops::Range<usize>) -> &[u8] {
        match self {
            Io::Loss(Data::F32(l)) | Io::Separate(Data::F32(l), _) => bytemuck::cast_slice(&l[range]),
            Io::Loss(Data::Half(l, _)) | Io::Separate(Data::Half(l, _), _) => bytemuck::cast_slice(&l[range]),
            Io::InPlace(GradOut::F32(l), _) => bytemuck::cast_slice(&l[range]),
            Io::InPlace(GradOut::Half(l), _) => bytemuck::cast_slice(&l[range]),
        }
    }
    /// How the kernel reads these logits and writes this gradient (`native_f16`: the
    /// device takes WGSL `f16`).
    fn format(&self, classes: usize, native_f16: bool) -> ElemFormat {
        let half = match self {
            Io::Loss(Data::Half(_, f)) | Io::Separate(Data::Half(_, f), _) => Some(*f),
            Io::InPlace(_, f) => *f,
            _ => None,
        };
        let half_grad = matches!(self, Io::Separate(_, GradOut::Half(_)) | Io::InPlace(GradOut::Half(_), _));
        match half {
            Some(format) => {
                ElemFormat::Half { format, half_grad, native: native_f16 && format == crate::HalfFormat::F16 }
            }
            None => ElemFormat::f32_for(classes),
        }
    }
    /// Bytes per gradient element read back.
    fn grad_bytes(&self) -> u64 {
        match self {
            Io::Separate(_, GradOut::Half(_)) | Io::InPlace(GradOut::Half(_), _) => 2,
            _ => 4,
        }
    }
    fn grad_kind(&self) -> GradKind {
        match self {
            Io::Loss(_) => GradKind::None,
            Io::Separate(..) => GradKind::Separate,
            Io::InPlace(..) => GradKind::InPlace,
        }
    }
    /// Copies gradient elements read back (as bytes) into the destination at `range`.
    fn write_grad(&mut self, range: std::ops::Range<usize>, bytes: &[u8]) {
        match self {
            Io::Loss(_) => {}
            Io::Separate(_, GradOut::F32(g)) | Io::InPlace(GradOut::F32(g), _) => {
                g[range.clone()].copy_from_slice(&bytemuck::cast_slice::<u8, f32>(bytes)[..range.len()]);
            }
            Io::Separate(_, GradOut::Half(g)) | Io::InPlace(GradOut::Half(g), _) => {
                g[range.clone()].copy_from_slice(&bytemuck::cast_slice::<u8, u16>(bytes)[..range.len()]);
            }
        }
    }
}

fn grad_mode(kind: GradKind) -> GradMode {
    match kind {
        GradKind::None => GradMode::None,
        GradKind::Separate => GradMode::Separate,
        GradKind::InPlace => GradMode::InPlace,
    }
}

/// What a chunk's readback slot holds, and where it goes.
struct Readback {
    /// Gradient elements in the readback (at 0) and where they go in the output.
    grad_to: Option<Range<usize>>,
    /// Rows whose loss and LSE are in the readback, and their offsets there.
    rows_to: Option<(Range<usize>, u64, u64)>,
    /// Rows whose metric records are in the readback, and their offset there.
    metrics_to: Option<(Range<usize>, u64)>,
}

struct Outputs {
    row_losses: Option<Vec<f32>>,
    lse: Option<Vec<f32>>,
    /// Each row's metric record, for the per-row outputs.
    metrics: Option<Vec<RowMetrics>>,
    /// The metrics' sums, reduced on the device.
    sums: Option<MetricSums>,
}

impl GpuContext {
    pub(crate) fn run(&self, mut io: Io<'_>, batch: &Batch, opts: &LossOptions) -> Result<LossOutput> {
        if batch.rows == 0 {
            return Ok(empty_output(opts));
        }
        let (rows, classes, grad) = (batch.rows, batch.classes, io.grad_kind());
        let half = matches!(io.format(classes, false), ElemFormat::Half { .. });
        let weights = opts.get_weights().map_or(0, <[f32]>::len);
        // Without the fused kernel's record binding (8 storage buffers a stage) the metrics
        // of f32 logits come from the row grid's partial states (4 + 8 bindings).
        let mut on_grid = false;
        if let Some(spec) = opts.get_metrics() {
            super::metrics::check_spec(spec, self.path_name())?;
            if self.kernels.rows_metrics.is_none() {
                if half {
                    return Err(self.no_metrics_binding());
                }
                on_grid = true;
            }
        }
        let (loss, mut outputs) = self.planned(
            |limits| {
                let grid_limits = PlanLimits { tuning: limits.tuning.grid_for_all(), ..*limits };
                let plan = Plan::new(rows, classes, grad, if on_grid { &grid_limits } else { limits })?;
                let split = matches!(plan.layout, Layout::Split { .. });
                if split && half {
                    return Err(Error::InvalidOption(format!(
                        "rows of {classes} classes are split across bindings, and the split kernels read \
                         f32 only; convert half-precision logits to f32 first"
                    )));
                }
                if split && weights > 0 {
                    return Err(split_weights_error(self.path_name(), classes));
                }
                Ok(plan)
            },
            |ws, plan| self.prepare(ws, plan, weights, opts.get_metrics()),
            |ws, plan| self.stream(ws, &mut io, batch, opts, &plan),
        )?;
        let metrics = outputs.sums.take().map(|sums| Metrics::from_sums(&sums, outputs.metrics.as_deref()));
        Ok(LossOutput {
            loss: match opts.get_reduction() {
                Reduction::None => None,
                // 0/0: every row ignored.
                Reduction::Mean if batch.mean_denominator == 0.0 => Some(f32::NAN),
                _ => Some(loss),
            },
            row_losses: outputs.row_losses,
            lse: outputs.lse,
            gradient: None,
            z_loss: None,
            metrics,
            ..Default::default()
        })
    }

    /// Makes every buffer big enough for `plan` (and its metric records and sums under
    /// `metrics`), rebuilding the bind groups only when a buffer was replaced.
    pub(crate) fn prepare(
        &self,
        ws: &mut Workspace,
        plan: &Plan,
        weights: usize,
        metrics: Option<&MetricsSpec>,
    ) {
        let d = &self.device;
        let wg = self.kernels.workgroup_size;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let chunk_bytes = plan.chunk_elems as u64 * 4;
        let rows = plan.slot_rows as u64;
        let partials = match plan.layout {
            // Three vec4 an entry (row_partials.wgsl).
            Layout::Split { pieces, blocks_per_piece, .. } => (pieces * blocks_per_piece * 48) as u64,
            Layout::Rows { blocks_per_row: Some(b), .. } => (plan.slot_rows * b * 48) as u64,
            Layout::Rows { blocks_per_row: None, .. } => 48,
        };
        let partials = partials.max(ws.entries_floor);
        let scratch = reduce_levels(rows, 0, wg, max_dim, 1.0, NO_INDEX).extent * 4;
        let sums = reduce_levels(plan.row_groups() as u64, 0, wg, max_dim, 1.0, NO_INDEX).extent * 4;
        let grad_bytes = if plan.grad == GradKind::Separate { chunk_bytes } else { 16 };
        let mut grow = Grow::new(d, &self.limits, MAX_PARAM_BLOCKS);
        grow.storage(&mut ws.logits, "xent logits", chunk_bytes);
        grow.storage(&mut ws.grad, "xent grad", grad_bytes);
        grow.storage(&mut ws.targets, "xent targets", rows * 4);
        grow.storage(&mut ws.row_loss, "xent row_loss", rows * 4);
        grow.storage(&mut ws.row_lse, "xent row_lse", rows * 4);
        grow.storage(&mut ws.row_weight, "xent row_weight", rows * 4);
        grow.storage(&mut ws.row_stats, "xent row_stats", rows * 8);
        grow.storage(&mut ws.scratch, "xent scratch", scratch);
        grow.storage(&mut ws.partials, "xent partials", partials);
        grow.storage(&mut ws.sums, "xent sums", sums);
        grow.storage(&mut ws.norm, "xent norm", 16);
        grow.storage(&mut ws.weights, "xent weights", weights as u64 * 4);
        grow.storage(&mut ws.upstream, "xent upstream", rows * 4);
        // The records and sums of the metrics (small when not asked: the merge binds the
        // records either way).
        let (records, entries) = match metrics {
            Some(spec) => {
                let chunks = plan.row_groups();
                let entries = super::metrics::entries_needed(spec, plan.slot_rows, chunks, wg, max_dim);
                (rows * RECORD_BYTES, entries * super::metrics::entry_words(spec) as u64 * 4)
            }
            None => (RECORD_BYTES, 16),
        };
        grow.storage(&mut ws.row_metrics, "xent row_metrics", records);
        grow.storage(&mut ws.metric_entries, "xent metric sums", entries);
        grow.params(&mut ws.params, "xent params");
        let per_row = metrics.is_some_and(MetricsSpec::get_per_row);
        let entry = metrics.map_or(0, |s| super::metrics::entry_words(s) as u64 * 4);
        let slot_bytes = readback_layout(plan, per_row).3.max(entry).max(ws.entries_floor);
        grow.readback(&mut ws.readback, plan.ring, "xent readback", slot_bytes);
        let created = grow.created();
        ws.allocations += created;
        if ws.groups.is_none() || created > 0 {
            let k = &self.kernels;
            let p = ws.params.get();
            let rows_buffers = [
                ws.logits.get(),
                ws.targets.get(),
                ws.row_loss.get(),
                ws.row_lse.get(),
                ws.grad.get(),
                ws.row_stats.get(),
                ws.norm.get(),
                ws.weights.get(),
            ];
            ws.groups = Some(BindGroups {
                rows: bind(d, &k.rows, p, &rows_buffers),
                rows_metrics: k.rows_metrics.as_ref().map(|kernel| {
                    let mut buffers = rows_buffers.to_vec();
                    buffers.push(ws.row_metrics.get());
                    bind(d, kernel, p, &buffers)
                }),
                metrics_reduce: bind(
                    d,
                    &k.reduce_metrics,
                    p,
                    &[ws.row_metrics.get(), ws.metric_entries.get()],
                ),
                partials: bind(
                    d,
                    &k.partials,
                    p,
                    &[ws.logits.get(), ws.targets.get(), ws.partials.get(), ws.weights.get()],
                ),
                merge: bind(
                    d,
                    &k.merge,
                    p,
                    &[
                        ws.partials.get(),
                        ws.targets.get(),
                        ws.row_loss.get(),
                        ws.row_lse.get(),
                        ws.row_weight.get(),
                        ws.row_stats.get(),
                        ws.weights.get(),
                        ws.row_metrics.get(),
                    ],
                ),
                backward: bind(
                    d,
                    &k.backward,
                    p,
                    &[
                        ws.logits.get(),
                        ws.targets.get(),
                        ws.row_stats.get(),
                        ws.norm.get(),
                        ws.grad.get(),
                        ws.weights.get(),
                        ws.upstream.get(),
                    ],
                ),
                reduce_scratch: bind(d, &k.reduce, p, &[ws.scratch.get()]),
                reduce_sums: bind(d, &k.reduce, p, &[ws.sums.get()]),
            });
        }
    }

    fn stream(
        &self,
        ws: &Workspace,
        io: &mut Io<'_>,
        batch: &Batch,
        opts: &LossOptions,
        plan: &Plan,
    ) -> Result<(f32, Outputs)> {
        // Buffers were made ready by `prepare`, in its own error scope.
        let groups = ws.groups.as_ref().expect("prepared");
        let (n, v) = (batch.rows, batch.classes);
        let wg = self.kernels.workgroup_size;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let grad_scale = batch.gradient_scale(opts.get_reduction());
        let mode = grad_mode(plan.grad);
        let spec = opts.get_metrics();
        let want_metrics = spec.is_some();
        // Each row's record comes back only for the per-row outputs; the sums are the
        // device's.
        let per_row = spec.is_some_and(MetricsSpec::get_per_row);
        let mut outputs = Outputs {
            row_losses: opts.wants_row_losses().then(|| vec![0.0; n]),
            lse: opts.wants_lse().then(|| vec![0.0; n]),
            metrics: per_row.then(|| vec![crate::RowMetrics::UNSET; n]),
            sums: None,
        };
        let want_rows = outputs.row_losses.is_some() || outputs.lse.is_some();
        self.queue.write_buffer(ws.norm.get(), 0, bytemuck::cast_slice(&[1.0f32, 1.0]));
        let kopts = &KernelOpts::new(opts, v).for_batch(batch, opts);
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(ws.weights.get(), 0, bytemuck::cast_slice(w));
        }

        let mut ring = Ring::new(self, &ws.readback, ws.params.get(), plan.ring);
        // Records the chunk's loss sum (rows 0..rows of row_loss) into sums[group].
        let chunk_sum = |rec: &mut Recorder, rows: usize, group: usize| {
            rec.copy(ws.row_loss.get(), 0, ws.scratch.get(), 0, rows as u64 * 4);
            let levels = reduce_levels(rows as u64, 0, wg, max_dim, 1.0, NO_INDEX);
            levels.record(rec, &self.kernels, &groups.reduce_scratch);
            rec.copy(ws.scratch.get(), u64::from(levels.result) * 4, ws.sums.get(), group as u64 * 4, 4);
        };
        let (rows_at, lse_at, metrics_at, _) = readback_layout(plan, per_row);
        // Copies the chunk's per-row results into the readback slot.
        let rows_readback = |rec: &mut Recorder, slot: usize, rows: usize| {
            let rb = ws.readback[slot].get();
            if want_rows {
                rec.copy(ws.row_loss.get(), 0, rb, rows_at, rows as u64 * 4);
                rec.copy(ws.row_lse.get(), 0, rb, lse_at, rows as u64 * 4);
            }
            if per_row {
                rec.copy(ws.row_metrics.get(), 0, rb, metrics_at, rows as u64 * RECORD_BYTES);
            }
        };
        let submit = |ring: &mut Ring<'_, Readback>,
                      rec: Recorder,
                      slot: usize,
                      grad_to: Option<Range<usize>>,
                      rows_to: Option<Range<usize>>| {
            let metrics_to = rows_to.clone().filter(|_| per_row);
            let rows_to = rows_to.filter(|_| want_rows);
            let map_bytes = match (&grad_to, &rows_to, &metrics_to) {
                (_, _, Some(r)) => metrics_at + r.len() as u64 * RECORD_BYTES,
                (_, Some(r), None) => lse_at + r.len() as u64 * 4,
                (Some(g), None, None) => g.len() as u64 * 4,
                (None, None, None) => 0,
            };
            ring.submit(
                rec,
                slot,
                map_bytes,
                Readback {
                    grad_to,
                    rows_to: rows_to.map(|r| (r, rows_at, lse_at)),
                    metrics_to: metrics_to.map(|r| (r, metrics_at)),
                },
            );
        };

        match plan.layout {
            Layout::Rows { threads_per_row, cached, blocks_per_row, .. } => {
                let rows_per_group = (wg / threads_per_row) as usize;
                for (group, chunk) in plan.chunks().enumerate() {
                    let slot = ring.next_slot(|r, b| copy_out(io, &mut outputs, r, b))?;
                    let rows = chunk.rows.len();
                    let elems = chunk.rows.start * v..chunk.rows.end * v;
                    self.queue.write_buffer(ws.logits.get(), 0, io.logit_bytes(elems.clone()));
                    self.queue.write_buffer(
                        ws.targets.get(),
                        0,
                        bytemuck::cast_slice(&batch.targets[chunk.rows.clone()]),
                    );
                    let mut rec = Recorder::new(&self.device, &self.limits);
                    // The row grid's kernels take PyTorch's plain options only; the fused
                    // kernel takes them all.
                    let f32_data = !matches!(io.format(v, self.native_f16()), ElemFormat::Half { .. });
                    match blocks_per_row.filter(|_| f32_data) {
                        // One workgroup per (row, column block): few rows still fill the device.
                        Some(_) => record_row_grid(
                            &mut rec,
                            &self.kernels,
                            [&groups.partials, &groups.merge, &groups.backward],
                            RowGrid {
                                rows,
                                classes: v,
                                ignore_index: Batch::IGNORED,
                                grad_scale,
                                mode,
                                metrics: want_metrics,
                            },
                            kopts,
                            self.limits.max_compute_workgroups_per_dimension,
                        ),
                        None => {
                            let wgs = self.tuning.rows_workgroups(rows.div_ceil(rows_per_group) as u64);
                            let params = RowParams {
                                rows: rows as u32,
                                classes: v as u32,
                                row_base: 0,
                                groups_x: groups_x(wgs, max_dim),
                                grad_scale,
                                grad_mode: mode as u32,
                                ignore_index: Batch::IGNORED,
                                threads_per_row,
                                cached: u32::from(cached),
                                ..bytemuck::Zeroable::zeroed()
                            }
                            .with_opts(kopts);
                            let (features, rows_bg) = match &groups.rows_metrics {
                                Some(g) if want_metrics => (kopts.features() | F_METRICS, g),
                                _ => (kopts.features(), &groups.rows),
                            };
                            let pipeline = self.kernels.rows_variants.get(
                                &self.device,
                                io.format(v, self.native_f16()),
                                features,
                            );
                            rec.dispatch_pipeline(&pipeline, rows_bg, &params, wgs);
                        }
                    }
                    // The chunk's metric sums into its entry.
                    if let Some(spec) = spec {
                        let chunks = plan.row_groups() as u32;
                        let levels =
                            metric_levels(spec, rows, true, 0, chunks, Some(group as u32), (wg, max_dim));
                        levels.record(&mut rec, &self.kernels, &groups.metrics_reduce);
                    }
                    chunk_sum(&mut rec, rows, group);
                    let grad_src = match plan.grad {
                        GradKind::None => None,
                        GradKind::Separate => Some(ws.grad.get()),
                        GradKind::InPlace => Some(ws.logits.get()),
                    };
                    if let Some(src) = grad_src {
                        rec.copy(src, 0, ws.readback[slot].get(), 0, elems.len() as u64 * io.grad_bytes());
                    }
                    rows_readback(&mut rec, slot, rows);
                    let rows_to = (want_rows || per_row).then_some(chunk.rows);
                    submit(&mut ring, rec, slot, grad_src.map(|_| elems), rows_to);
                }
            }
            Layout::Split { piece_cols, pieces, blocks_per_piece } => {
                let piece_of =
                    |r: usize, p: usize| r * v + p * piece_cols..r * v + ((p + 1) * piece_cols).min(v);
                for r in 0..n {
                    self.queue.write_buffer(
                        ws.targets.get(),
                        0,
                        bytemuck::cast_slice(&batch.targets[r..r + 1]),
                    );
                    // With metrics the target's piece goes first: the other pieces count
                    // above its z, read from its partial entry.
                    let t = batch.targets[r];
                    let target_piece = (want_metrics && t != Batch::IGNORED).then(|| t as usize / piece_cols);
                    let zt_entry = target_piece.map_or(NO_ENTRY, |tp| {
                        (tp * blocks_per_piece + (t as usize - tp * piece_cols) / SPLIT_BLOCK_COLS) as u32
                    });
                    let order: Vec<usize> = target_piece
                        .into_iter()
                        .chain((0..pieces).filter(|&p| Some(p) != target_piece))
                        .collect();
                    for (i, &p) in order.iter().enumerate() {
                        let slot = ring.next_slot(|r, b| copy_out(io, &mut outputs, r, b))?;
                        let elems = piece_of(r, p);
                        self.queue.write_buffer(ws.logits.get(), 0, io.logit_bytes(elems.clone()));
                        let mut rec = Recorder::new(&self.device, &self.limits);
                        let wgs = blocks_per_piece as u64;
                        let params = PartialParams {
                            rows: 1,
                            row_stride: elems.len() as u32,
                            cols: elems.len() as u32,
                            col_base: (p * piece_cols) as u32,
                            block_cols: SPLIT_BLOCK_COLS as u32,
                            blocks: blocks_per_piece as u32,
                            row_base: 0,
                            groups_x: groups_x(wgs, max_dim),
                            out_base: (p * blocks_per_piece) as u32,
                            out_stride: (pieces * blocks_per_piece) as u32,
                            ignore_index: Batch::IGNORED,
                            classes: v as u32,
                            metrics: u32::from(want_metrics),
                            zt_entry,
                            ..bytemuck::Zeroable::zeroed()
                        }
                        .with_opts(kopts);
                        rec.dispatch(&self.kernels.partials, &groups.partials, &params, wgs);
                        let last = i + 1 == pieces;
                        if last {
                            let params = MergeParams {
                                rows: 1,
                                blocks: (pieces * blocks_per_piece) as u32,
                                row_base: 0,
                                groups_x: 1,
                                classes: v as u32,
                                ignore_index: Batch::IGNORED,
                                metrics: u32::from(want_metrics),
                                ..bytemuck::Zeroable::zeroed()
                            }
                            .with_opts(kopts);
                            rec.dispatch(&self.kernels.merge, &groups.merge, &params, 1);
                            // The row's metric sums into its entry.
                            if let Some(spec) = spec {
                                let chunks = plan.row_groups() as u32;
                                let levels =
                                    metric_levels(spec, 1, true, 0, chunks, Some(r as u32), (wg, max_dim));
                                levels.record(&mut rec, &self.kernels, &groups.metrics_reduce);
                            }
                            chunk_sum(&mut rec, 1, r);
                            rows_readback(&mut rec, slot, 1);
                        }
                        let rows_to = (last && (want_rows || per_row)).then_some(r..r + 1);
                        submit(&mut ring, rec, slot, None, rows_to);
                    }
                    if plan.grad == GradKind::None {
                        continue;
                    }
                    for p in 0..pieces {
                        let slot = ring.next_slot(|r, b| copy_out(io, &mut outputs, r, b))?;
                        let elems = piece_of(r, p);
                        self.queue.write_buffer(ws.logits.get(), 0, io.logit_bytes(elems.clone()));
                        let mut rec = Recorder::new(&self.device, &self.limits);
                        let wgs = blocks_per_piece as u64;
                        let params = BackwardParams {
                            rows: 1,
                            row_stride: elems.len() as u32,
                            cols: elems.len() as u32,
                            col_base: (p * piece_cols) as u32,
                            block_cols: SPLIT_BLOCK_COLS as u32,
                            blocks: blocks_per_piece as u32,
                            row_base: 0,
                            groups_x: groups_x(wgs, max_dim),
                            scale: grad_scale,
                            grad_mode: mode as u32,
                            ignore_index: Batch::IGNORED,
                            classes: v as u32,
                            ..bytemuck::Zeroable::zeroed()
                        }
                        .with_opts(kopts);
                        rec.dispatch(&self.kernels.backward, &groups.backward, &params, wgs);
                        let src =
                            if plan.grad == GradKind::Separate { ws.grad.get() } else { ws.logits.get() };
                        rec.copy(src, 0, ws.readback[slot].get(), 0, elems.len() as u64 * 4);
                        submit(&mut ring, rec, slot, Some(elems), None);
                    }
                }
            }
        }
        ring.drain(|r, b| copy_out(io, &mut outputs, r, b))?;

        // The sum over chunks, on the device; `mean` divides in the last level.
        // A zero divisor (every row ignored) divides by 1; the caller reports NaN.
        let divisor = batch.divisor(opts.get_reduction());
        let d = if divisor > 0.0 { divisor as f32 } else { 1.0 };
        let count = plan.row_groups() as u64;
        let loss = self.reduce_sums(
            ws.sums.get(),
            &groups.reduce_sums,
            count,
            d,
            ws.params.get(),
            ring.readback(0),
        )?;
        if let Some(spec) = spec {
            let entries = (ws.metric_entries.get(), &groups.metrics_reduce);
            let chunks = plan.row_groups();
            outputs.sums =
                Some(self.read_metric_sums(spec, entries, chunks, ws.params.get(), ring.readback(0))?);
        }
        Ok((loss, outputs))
    }
}

/// Copies a finished chunk's readback into the outputs.
fn copy_out(io: &mut Io<'_>, outputs: &mut Outputs, what: Readback, bytes: &[u8]) {
    if let Some(range) = what.grad_to {
        io.write_grad(range, bytes);
    }
    let floats: &[f32] = bytemuck::cast_slice(&bytes[..bytes.len() / 4 * 4]);
    if let Some((rows, loss_at, lse_at)) = what.rows_to {
        let (l, e) = ((loss_at / 4) as usize, (lse_at / 4) as usize);
        if let Some(out) = &mut outputs.row_losses {
            out[rows.clone()].copy_from_slice(&floats[l..l + rows.len()]);
        }
        if let Some(out) = &mut outputs.lse {
            out[rows.clone()].copy_from_slice(&floats[e..e + rows.len()]);
        }
    }
    if let (Some((rows, at)), Some(out)) = (what.metrics_to, &mut outputs.metrics) {
        let n = rows.len();
        let words: &[u32] = bytemuck::cast_slice(&bytes[..bytes.len() / 4 * 4]);
        super::metrics::decode(&words[(at / 4) as usize..][..n * 8], &mut out[rows]);
    }
}

/// Class weights cannot be bound whole when a row is longer than one binding.
pub(crate) fn split_weights_error(path: String, classes: usize) -> Error {
    Error::Unsupported {
        path,
        cell: "class weights in rows longer than one storage binding".into(),
        why: format!(
            "rows of {classes} classes are split across bindings, and their class weights ({classes} values) \
             do not fit one binding either; use the CPU path for class weights at this size"
        ),
    }
}

/// Offsets in a readback slot of the row losses, the LSE and (with `metrics`) the metric
/// records (after the gradient chunk), and the slot's size.
fn readback_layout(plan: &Plan, metrics: bool) -> (u64, u64, u64, u64) {
    let grad = if plan.grad == GradKind::None { 0 } else { plan.chunk_elems as u64 * 4 };
    let rows = plan.slot_rows as u64;
    let rows_at = grad.next_multiple_of(16);
    let lse_at = rows_at + (rows * 4).next_multiple_of(16);
    let metrics_at = lse_at + (rows * 4).next_multiple_of(16);
    (rows_at, lse_at, metrics_at, metrics_at + if metrics { rows * 32 } else { 0 })
}

pub(crate) fn empty_output(opts: &LossOptions) -> LossOutput {
    LossOutput {
        loss: match opts.get_reduction() {
            Reduction::None => None,
            Reduction::Sum => Some(0.0),
            // 0/0, unless the caller gave the denominator.
            Reduction::Mean => Some(opts.get_n_items().map_or(f32::NAN, |_| 0.0)),
        },
        row_losses: opts.wants_row_losses().then(Vec::new),
        lse: opts.wants_lse().then(Vec::new),
        gradient: opts.wants_gradient().then(Vec::new),
        z_loss: None,
        ..Default::default()
    }
}
