//! Cross-entropy with probability (soft) targets on the GPU: chunks of whole rows (logits
//! and targets) as [`Plan`] says, one workgroup per row, through the ring of readback
//! slots; per-chunk loss sums tree-reduced on the device, then over the chunks.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::options::{LossOptions, LossOutput, Reduction, Upstream};
use crate::problem::Mode;

use super::buffers::{Grow, Recorder, bind, groups_x};
use super::context::GpuContext;
use super::kernels::{
    KernelOpts, NO_INDEX, SOFT_GRAD, SOFT_METRICS, SOFT_PER_ROW, SOFT_SAVED_LSE, SoftParams,
};
use super::metrics::{RECORD_BYTES, check_spec, decode, entries_needed, entry_words, metric_levels};
use super::plan::{GradKind, Plan, Streamed};
use super::reduce::reduce_levels;
use super::ring::{MAX_PARAM_BLOCKS, Ring};
use super::workspace::{SoftWorkspace, Workspace};
use crate::metrics::{MetricSums, Metrics, MetricsSpec, RowMetrics};

/// The `SOFT_*` flags and the gradient scale of `cross_entropy_soft.wgsl` for a gradient
/// (`grad`), a saved LSE (`saved`) and `upstream`, under the `mean` denominator `d` (1
/// otherwise). Shared by the host stream and the device-resident path.
pub(crate) fn soft_flags(grad: bool, saved: bool, upstream: Upstream<'_>, d: f64) -> (u32, f32) {
    let mut flags = if grad { SOFT_GRAD } else { 0 };
    let mut scale = (1.0 / d) as f32;
    match upstream {
        Upstream::Scalar(g) => scale *= g,
        Upstream::PerRow(_) | Upstream::PerElement(_) => flags |= SOFT_PER_ROW,
    }
    if saved {
        flags |= SOFT_SAVED_LSE;
    }
    (flags, scale)
}

/// The parameters of `cross_entropy_soft.wgsl` over `rows` rows of `classes`, the first
/// at `row_base` of the per-row bindings (one workgroup per row, folded into 2D).
pub(crate) fn soft_params(
    k: &KernelOpts,
    rows: usize,
    classes: usize,
    row_base: usize,
    flags: u32,
    grad_scale: f32,
    max_dim: u32,
) -> SoftParams {
    SoftParams {
        rows: rows as u32,
        classes: classes as u32,
        groups_x: groups_x(rows as u64, max_dim),
        flags,
        has_weights: k.has_weights,
        grad_scale,
        logit_scale: k.logit_scale,
        softcap: k.softcap,
        smoothing: k.smoothing,
        z_loss: k.z_loss,
        weight_total: k.weight_total,
        row_base: row_base as u32,
    }
}

/// A soft-target evaluation's inputs beyond the logits and targets.
pub(crate) struct SoftRun<'a> {
    /// Fused, or a separate backward from a saved LSE.
    pub mode: Mode<'a>,
    /// Where the gradient goes (none: the loss only).
    pub grad: Option<&'a mut [f32]>,
}

/// What a call reads back besides the gradient.
#[derive(Clone, Copy)]
struct Wanted {
    /// The loss over the chunks.
    total: bool,
    row_losses: bool,
    lse: bool,
    /// The metrics' sums (reduced on the device).
    metrics: bool,
    /// Each row's metric record.
    per_row: bool,
}

/// Offsets in a readback slot: the gradient at 0, then the row losses, the LSE and the
/// metric records.
struct SlotLayout {
    loss_at: u64,
    lse_at: u64,
    metrics_at: u64,
    size: u64,
}

impl SlotLayout {
    fn of(plan: &Plan, metrics: bool) -> Self {
        let grad = if plan.grad == GradKind::None { 0 } else { plan.chunk_elems as u64 * 4 };
        let rows = plan.slot_rows as u64 * 4;
        let loss_at = grad.next_multiple_of(16);
        let lse_at = loss_at + rows.next_multiple_of(16);
        let metrics_at = lse_at + rows.next_multiple_of(16);
        let records = if metrics { plan.slot_rows as u64 * RECORD_BYTES } else { 0 };
        Self { loss_at, lse_at, metrics_at, size: metrics_at + records }
    }
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
        let z = opts.get_z_loss();
        let total = !backward && reduction != Reduction::None;
        let want = Wanted {
            total,
            row_losses: !backward && opts.wants_row_losses(),
            lse: !backward && (opts.wants_lse() || (total && z > 0.0)),
            metrics: !backward && opts.get_metrics().is_some(),
            per_row: !backward && opts.get_metrics().is_some_and(MetricsSpec::get_per_row),
        };
        if let Some(spec) = opts.get_metrics().filter(|_| want.metrics) {
            check_spec(spec, self.path_name())?;
        }
        let max_binding = self.plan_limits().max_binding;
        if classes as u64 * 4 > max_binding {
            return Err(Error::Unsupported {
                path: self.path_name(),
                cell: "probability targets in rows longer than one storage binding".into(),
                why: format!(
                    "a row of {classes} classes is larger than one binding ({max_binding} bytes) and the \
                     probability kernel does not split rows; use the CPU path at this size"
                ),
            });
        }
        let mut out = LossOutput {
            row_losses: want.row_losses.then(|| vec![0.0; rows]),
            lse: want.lse.then(|| vec![0.0; rows]),
            ..LossOutput::default()
        };
        let mut records = want.per_row.then(|| vec![RowMetrics::UNSET; rows]);
        let mut sums = None;
        let sum = if rows == 0 {
            0.0
        } else {
            let grad = if run.grad.is_some() { GradKind::Separate } else { GradKind::None };
            let weights = opts.get_weights().map_or(0, <[f32]>::len);
            self.planned(
                |limits| Plan::streaming(rows, classes, Streamed::Probabilities(grad), limits),
                |ws, plan| self.prepare_soft(ws, plan, weights, opts.get_metrics().filter(|_| want.metrics)),
                |ws, plan| {
                    let outs = (&mut out, records.as_deref_mut(), &mut sums);
                    self.soft_chunks(&ws.soft, &plan, logits, targets, run, opts, d, want, outs)
                },
            )?
        };
        out.metrics = match (opts.get_metrics(), sums) {
            (Some(_), Some(sums)) => Some(Metrics::from_sums(&sums, records.as_deref())),
            // No rows: the figures of none.
            (Some(spec), None) if want.metrics => Some(Metrics::from_rows(spec, &[])),
            _ => None,
        };
        if backward {
            return Ok(LossOutput::default());
        }
        if total {
            // 0/0 for the mean of no rows.
            out.loss = Some(if rows == 0 { (0.0 / d) as f32 } else { sum });
            if z > 0.0 {
                let lse = out.lse.as_deref().unwrap_or_default();
                let zs: f64 = lse.iter().map(|&l| z * f64::from(l) * f64::from(l)).sum();
                out.z_loss = Some((zs / d) as f32);
            }
        }
        if !opts.wants_lse() {
            out.lse = None;
        }
        Ok(out)
    }

    /// Makes the soft-target buffers big enough for `plan`, rebuilding the bind groups
    /// only when a buffer was replaced.
    fn prepare_soft(&self, ws: &mut Workspace, plan: &Plan, weights: usize, metrics: Option<&MetricsSpec>) {
        let dev = &self.device;
        let wg = self.kernels.workgroup_size;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let chunk_bytes = plan.chunk_elems as u64 * 4;
        let rows = plan.slot_rows as u64 * 4;
        let grad = if plan.grad == GradKind::None { 16 } else { chunk_bytes };
        let scratch = reduce_levels(plan.slot_rows as u64, 0, wg, max_dim, 1.0, NO_INDEX).extent * 4;
        let sums = reduce_levels(plan.chunk_sums() as u64, 0, wg, max_dim, 1.0, NO_INDEX).extent * 4;
        let s: &mut SoftWorkspace = &mut ws.soft;
        let mut grow = Grow::new(dev, &self.limits, MAX_PARAM_BLOCKS);
        grow.storage(&mut s.logits, "xent soft logits", chunk_bytes);
        grow.storage(&mut s.probs, "xent soft targets", chunk_bytes);
        grow.storage(&mut s.row_loss, "xent soft row_loss", rows);
        grow.storage(&mut s.row_lse, "xent soft row_lse", rows);
        grow.storage(&mut s.grad, "xent soft grad", grad);
        grow.storage(&mut s.weights, "xent soft weights", weights as u64 * 4);
        grow.storage(&mut s.upstream, "xent soft upstream", rows);
        grow.storage(&mut s.scratch, "xent soft scratch", scratch);
        grow.storage(&mut s.sums, "xent soft sums", sums);
        let (records, entries, entry) = match metrics {
            Some(spec) => {
                let entries = entries_needed(spec, plan.slot_rows, plan.chunk_sums(), wg, max_dim);
                let entry = entry_words(spec) as u64 * 4;
                (plan.slot_rows as u64 * RECORD_BYTES, entries * entry, entry)
            }
            None => (RECORD_BYTES, 16, 0),
        };
        grow.storage(&mut s.row_metrics, "xent soft row_metrics", records);
        grow.storage(&mut s.metric_entries, "xent soft metric sums", entries);
        grow.params(&mut s.params, "xent soft params");
        let per_row = metrics.is_some_and(MetricsSpec::get_per_row);
        let slot_bytes = SlotLayout::of(plan, per_row).size.max(entry);
        grow.readback(&mut s.readback, plan.ring, "xent soft readback", slot_bytes);
        let created = grow.created();
        if s.groups.is_none() || created > 0 {
            let k = &self.kernels;
            let p = s.params.get();
            s.groups = Some([
                bind(
                    dev,
                    &k.soft,
                    p,
                    &[
                        s.logits.get(),
                        s.probs.get(),
                        s.row_loss.get(),
                        s.row_lse.get(),
                        s.grad.get(),
                        s.weights.get(),
                        s.upstream.get(),
                        s.row_metrics.get(),
                    ],
                ),
                bind(dev, &k.reduce, p, &[s.scratch.get()]),
                bind(dev, &k.reduce, p, &[s.sums.get()]),
            ]);
            s.metrics_group =
                Some(bind(dev, &k.reduce_metrics, p, &[s.row_metrics.get(), s.metric_entries.get()]));
        }
        ws.allocations += created;
    }

    /// Streams the chunks of `plan`; returns the loss over them (NaN when not wanted).
    #[allow(clippy::too_many_arguments)]
    fn soft_chunks(
        &self,
        ws: &SoftWorkspace,
        plan: &Plan,
        logits: &[f32],
        targets: &[f32],
        run: SoftRun<'_>,
        opts: &LossOptions,
        d: f64,
        want: Wanted,
        (out, mut records, sums): (&mut LossOutput, Option<&mut [RowMetrics]>, &mut Option<MetricSums>),
    ) -> Result<f32> {
        let SoftRun { mode, mut grad } = run;
        let (saved, upstream) = match mode {
            Mode::Fused => (None, Upstream::Scalar(1.0)),
            Mode::Backward { lse, upstream } => (lse, upstream),
        };
        let v = plan.classes;
        let wg = self.kernels.workgroup_size;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let [soft_bg, scratch_bg, sums_bg] = ws.groups.as_ref().expect("prepared");
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(ws.weights.get(), 0, bytemuck::cast_slice(w));
        }
        let k = KernelOpts::new(opts, v);
        let layout = SlotLayout::of(plan, want.per_row);
        let spec = opts.get_metrics().filter(|_| want.metrics);
        let metrics_bg = ws.metrics_group.as_ref().expect("prepared");
        let (loss_at, lse_at, metrics_at) = (layout.loss_at, layout.lse_at, layout.metrics_at);
        let mut ring = Ring::new(self, &ws.readback, ws.params.get(), plan.ring);
        // Copies a finished chunk's rows out of its readback.
        let mut copy = |rows: Range<usize>, bytes: &[u8]| {
            let f: &[f32] = bytemuck::cast_slice(&bytes[..bytes.len() / 4 * 4]);
            if let Some(g) = grad.as_deref_mut() {
                let span = rows.start * v..rows.end * v;
                g[span.clone()].copy_from_slice(&f[..span.len()]);
            }
            let (la, ea) = ((loss_at / 4) as usize, (lse_at / 4) as usize);
            if let Some(l) = &mut out.row_losses {
                l[rows.clone()].copy_from_slice(&f[la..la + rows.len()]);
            }
            if let Some(e) = &mut out.lse {
                e[rows.clone()].copy_from_slice(&f[ea..ea + rows.len()]);
            }
            if let Some(m) = records.as_deref_mut() {
                let n = rows.len();
                let words: &[u32] = bytemuck::cast_slice(&bytes[..bytes.len() / 4 * 4]);
                decode(&words[(metrics_at / 4) as usize..][..n * 8], &mut m[rows]);
            }
        };
        let (mut flags, scale) = soft_flags(plan.grad != GradKind::None, saved.is_some(), upstream, d);
        if want.metrics {
            flags |= SOFT_METRICS;
        }
        for (c, chunk) in plan.chunks().enumerate() {
            let slot = ring.next_slot(&mut copy)?;
            let r = chunk.rows.clone();
            let rows = r.len();
            let span = chunk.span(v);
            self.queue.write_buffer(ws.logits.get(), 0, bytemuck::cast_slice(&logits[span.clone()]));
            self.queue.write_buffer(ws.probs.get(), 0, bytemuck::cast_slice(&targets[span.clone()]));
            if let Some(saved) = saved {
                self.queue.write_buffer(ws.row_lse.get(), 0, bytemuck::cast_slice(&saved[r.clone()]));
            }
            if let Upstream::PerRow(g) | Upstream::PerElement(g) = upstream {
                self.queue.write_buffer(ws.upstream.get(), 0, bytemuck::cast_slice(&g[r.clone()]));
            }
            let params = soft_params(&k, rows, v, 0, flags, scale, max_dim);
            let mut rec = Recorder::new(&self.device, &self.limits);
            rec.dispatch(&self.kernels.soft, soft_bg, &params, rows as u64);
            if let Some(spec) = spec {
                let chunks = plan.chunk_sums() as u32;
                metric_levels(spec, rows, true, 0, chunks, Some(c as u32), (wg, max_dim)).record(
                    &mut rec,
                    &self.kernels,
                    metrics_bg,
                );
            }
            if want.total {
                rec.copy(ws.row_loss.get(), 0, ws.scratch.get(), 0, rows as u64 * 4);
                let levels = reduce_levels(rows as u64, 0, wg, max_dim, 1.0, NO_INDEX);
                levels.record(&mut rec, &self.kernels, scratch_bg);
                rec.copy(ws.scratch.get(), u64::from(levels.result) * 4, ws.sums.get(), c as u64 * 4, 4);
            }
            let rb = ring.readback(slot);
            let mut map = 0;
            if plan.grad != GradKind::None {
                map = span.len() as u64 * 4;
                rec.copy(ws.grad.get(), 0, rb, 0, map);
            }
            if want.row_losses {
                map = loss_at + rows as u64 * 4;
                rec.copy(ws.row_loss.get(), 0, rb, loss_at, rows as u64 * 4);
            }
            if want.lse {
                map = lse_at + rows as u64 * 4;
                rec.copy(ws.row_lse.get(), 0, rb, lse_at, rows as u64 * 4);
            }
            if want.per_row {
                map = metrics_at + rows as u64 * RECORD_BYTES;
                rec.copy(ws.row_metrics.get(), 0, rb, metrics_at, rows as u64 * RECORD_BYTES);
            }
            ring.submit(rec, slot, map, r);
        }
        ring.drain(&mut copy)?;
        if let Some(spec) = spec {
            let entries = (ws.metric_entries.get(), metrics_bg);
            let chunks = plan.chunk_sums();
            *sums = Some(self.read_metric_sums(spec, entries, chunks, ws.params.get(), ring.readback(0))?);
        }
        if !want.total {
            return Ok(f32::NAN);
        }
        let count = plan.chunk_sums() as u64;
        self.reduce_sums(ws.sums.get(), sums_bg, count, d as f32, ws.params.get(), ring.readback(0))
    }
}
