//! Vocabulary shards of device-resident logits, for engines whose shard of the logits
//! already lives in a GPU buffer (a tensor-parallel rank's): the partials are recorded into
//! the caller's encoder over its buffers in place (`row_partials.wgsl`, a workgroup per row
//! and block of 4096 columns) and read back as one small entry a block — O(rows), what
//! the ranks exchange — and the shard's gradient is recorded from the merged (max, sum)
//! states into the caller's gradient buffer (`cross_entropy_backward.wgsl` with the
//! shard's column base and the whole vocabulary's V, Σ w and class weights). Logits and
//! gradient never leave the device.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::options::{Batch, LossOptions, Targets, Upstream};
use crate::row_state::RowState;
use crate::vocab::VocabPartial;

use super::buffers::{Recorder, bind_ranges, groups_x, params_stride};
use super::context::GpuContext;
use super::kernels::{BackwardParams, GradMode, KernelOpts, NO_ENTRY, PartialParams};
use super::resident::{DeviceSlice, DeviceWorkspace, slot};
use super::tuning::SPLIT_BLOCK_COLS;
use super::vocab::entry_partial;

/// A shard of the vocabulary in a caller's buffers: f32 logits [rows, width] of the
/// columns `columns` of a `classes`-wide vocabulary, and i32 class indices \[rows\] of the
/// whole vocabulary (ignored rows hold the options' `ignore_index`; a target the device
/// finds outside `[0, classes)` is an ignored row). Offsets are multiples of
/// `min_storage_buffer_offset_alignment`; both buffers need `BufferUsages::STORAGE`.
#[derive(Clone, Debug)]
pub struct DeviceShard<'a> {
    /// The shard's logits.
    pub logits: DeviceSlice<'a>,
    /// The rows' targets.
    pub targets: DeviceSlice<'a>,
    /// Rows N.
    pub rows: usize,
    /// The shard's columns of the whole vocabulary.
    pub columns: Range<usize>,
    /// The whole vocabulary's size V.
    pub classes: usize,
}

/// A shard's partial entries on the device (one per row and block of columns), valid once
/// the caller has submitted the encoder: read them with
/// [`GpuContext::read_vocab_partials`].
pub struct DevicePartials {
    /// The entries: three vec4 a (row, block) (`row_partials.wgsl`).
    pub entries: wgpu::Buffer,
    rows: usize,
    blocks: usize,
    first_col: usize,
    smoothing: bool,
    metrics: bool,
    _keep: Vec<wgpu::Buffer>,
}

impl GpuContext {
    /// Checks a device shard: buffers, alignment, sizes, one binding, the options.
    fn check_device_shard(&self, shard: &DeviceShard<'_>, opts: &LossOptions) -> Result<(u64, usize)> {
        opts.validate(shard.classes)?;
        let (n, width) = (shard.rows, shard.columns.len());
        if shard.columns.end > shard.classes || shard.columns.start > shard.columns.end {
            return Err(Error::InvalidOption(format!(
                "columns {:?} of a vocabulary of {} classes",
                shard.columns, shard.classes
            )));
        }
        let align = u64::from(self.limits.min_storage_buffer_offset_alignment);
        let bind_cap = self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size);
        let bytes = (n as u64).saturating_mul(width as u64).saturating_mul(4);
        for (what, s, need) in [("logits", shard.logits, bytes), ("targets", shard.targets, n as u64 * 4)] {
            if !s.buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(Error::InvalidOption(format!("{what} buffer needs BufferUsages::STORAGE")));
            }
            if !s.offset.is_multiple_of(align) {
                return Err(Error::InvalidOption(format!(
                    "{what} offset {} is not a multiple of min_storage_buffer_offset_alignment ({align})",
                    s.offset
                )));
            }
            if s.offset.saturating_add(need) > s.buffer.size() {
                return Err(Error::Shape {
                    what: format!("{what} buffer (bytes from offset {})", s.offset),
                    got: s.buffer.size().saturating_sub(s.offset) as usize,
                    expected: need as usize,
                });
            }
        }
        let blocks = width.div_ceil(SPLIT_BLOCK_COLS).max(1);
        let weights = opts.get_weights().map_or(0, |w| w.len() as u64 * 4);
        for (what, need) in [
            ("a shard's logits", bytes),
            ("its partial entries", (n * blocks * 48) as u64),
            ("class weights", weights),
        ] {
            if need > bind_cap {
                return Err(Error::TooLarge {
                    what: what.into(),
                    needed: need,
                    limit: bind_cap,
                    hint: "record the shard in parts of rows (or use the host API, which streams)".into(),
                });
            }
        }
        let max_groups = u64::from(self.limits.max_compute_workgroups_per_dimension).pow(2);
        if (n * blocks) as u64 > max_groups {
            return Err(Error::TooLarge {
                what: format!("{} workgroups of {n} rows × {blocks} blocks", n * blocks),
                needed: (n * blocks) as u64,
                limit: max_groups,
                hint: "record the shard in parts of rows".into(),
            });
        }
        Ok((bytes, blocks))
    }

    /// Records the partials of a device shard into `encoder` (the caller submits it): one
    /// entry a row and block of 4096 columns in a buffer of `workspace`, combined per row
    /// on the host by [`read_vocab_partials`](Self::read_vocab_partials). With
    /// [`LossOptions::metrics`], the entries carry the metrics' parts too.
    pub fn record_vocab_partials(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        shard: &DeviceShard<'_>,
        opts: &LossOptions,
        workspace: &mut DeviceWorkspace,
    ) -> Result<DevicePartials> {
        let (bytes, blocks) = self.check_device_shard(shard, opts)?;
        let (d, n, v) = (&self.device, shard.rows, shard.classes);
        let metrics = opts.get_metrics().is_some();
        let entries = workspace.storage(
            d,
            slot::PARTIALS,
            "xent vocabulary partials",
            ((n * blocks).max(1) * 48) as u64,
        );
        let weights = workspace.storage(d, slot::CLASS_WEIGHTS, "xent class weights", (v as u64 * 4).max(16));
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(&weights, 0, bytemuck::cast_slice(w));
        }
        let params = workspace.uniform(d, slot::PARAMS, "xent params", params_stride(&self.limits));
        if n > 0 && !shard.columns.is_empty() {
            let bg = bind_ranges(
                d,
                &self.kernels.partials,
                &params,
                &[
                    shard.logits.range(bytes),
                    shard.targets.range(n as u64 * 4),
                    (&entries, 0, entries.size()),
                    (&weights, 0, weights.size()),
                ],
            );
            let wgs = (n * blocks) as u64;
            let width = shard.columns.len();
            let p = PartialParams {
                rows: n as u32,
                row_stride: width as u32,
                cols: width as u32,
                col_base: shard.columns.start as u32,
                block_cols: SPLIT_BLOCK_COLS as u32,
                blocks: blocks as u32,
                row_base: 0,
                groups_x: groups_x(wgs, self.limits.max_compute_workgroups_per_dimension),
                out_base: 0,
                out_stride: blocks as u32,
                ignore_index: device_ignore_index(opts),
                classes: v as u32,
                metrics: u32::from(metrics),
                zt_entry: NO_ENTRY,
                ..bytemuck::Zeroable::zeroed()
            }
            .with_opts(&KernelOpts::new(opts, v));
            let mut rec = Recorder::into_encoder(encoder, &self.limits);
            rec.dispatch(&self.kernels.partials, &bg, &p, wgs);
            rec.write_params(&self.queue, &params);
        }
        Ok(DevicePartials {
            entries,
            rows: if shard.columns.is_empty() { 0 } else { n },
            blocks,
            first_col: shard.columns.start,
            smoothing: opts.get_label_smoothing() > 0.0,
            metrics,
            _keep: vec![weights, params],
        })
    }

    /// Reads a recorded shard's partials back (once its encoder was submitted) and
    /// combines each row's blocks in column order: one [`VocabPartial`] a row (the empty
    /// partial for every row of an empty shard).
    pub fn read_vocab_partials(&self, partials: &DevicePartials, rows: usize) -> Result<Vec<VocabPartial>> {
        let mut out = vec![VocabPartial::EMPTY; rows];
        if partials.rows == 0 {
            return Ok(out);
        }
        let words = self.read_device_buffer(&partials.entries, partials.rows * partials.blocks * 12)?;
        for (r, row) in words.chunks_exact(partials.blocks * 12).enumerate().take(rows) {
            for (b, x) in row.chunks_exact(12).enumerate() {
                let first = partials.first_col + b * SPLIT_BLOCK_COLS;
                out[r] = out[r].combine(entry_partial(x, first, partials.smoothing, partials.metrics));
            }
        }
        Ok(out)
    }

    /// Records a device shard's gradient into `grad` (f32 [rows, width], aligned like the
    /// logits) from the whole rows' merged states, times `upstream` (a scalar, or one per
    /// row: the host's values), under the whole problem's options. `targets` are the
    /// host's copy of the rows' targets (the `mean` denominators come from them; the
    /// kernel reads the shard's device targets).
    #[allow(clippy::too_many_arguments)]
    pub fn record_vocab_gradient(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        shard: &DeviceShard<'_>,
        targets: Targets<'_>,
        states: &[RowState],
        upstream: Upstream<'_>,
        opts: &LossOptions,
        grad: DeviceSlice<'_>,
        workspace: &mut DeviceWorkspace,
    ) -> Result<()> {
        let (bytes, blocks) = self.check_device_shard(shard, opts)?;
        let (d, n, v) = (&self.device, shard.rows, shard.classes);
        let batch = Batch::new(n * v, v, targets, opts)?;
        crate::vocab::check_rows("merged states", states.len(), n)?;
        upstream.check(n)?;
        if matches!(upstream, Upstream::PerElement(_)) {
            return Err(Error::InvalidOption(
                "cross-entropy takes a scalar or per-row upstream gradient".into(),
            ));
        }
        if !grad.buffer.usage().contains(wgpu::BufferUsages::STORAGE)
            || grad.offset + bytes > grad.buffer.size()
        {
            return Err(Error::Shape {
                what: "gradient buffer (STORAGE, bytes from its offset)".into(),
                got: grad.buffer.size().saturating_sub(grad.offset) as usize,
                expected: bytes as usize,
            });
        }
        if n == 0 || shard.columns.is_empty() {
            return Ok(());
        }
        let stats = workspace.storage(d, slot::STATS, "xent row_stats", n as u64 * 8);
        let st: Vec<[f32; 2]> = states.iter().map(|s| [s.max, s.sum]).collect();
        self.queue.write_buffer(&stats, 0, bytemuck::cast_slice(&st));
        let norm = workspace.storage(d, slot::NORM, "xent norm", 16);
        self.queue.write_buffer(&norm, 0, bytemuck::cast_slice(&[1.0f32, 1.0, 0.0, 0.0]));
        let weights = workspace.storage(d, slot::CLASS_WEIGHTS, "xent class weights", (v as u64 * 4).max(16));
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(&weights, 0, bytemuck::cast_slice(w));
        }
        let up = workspace.storage(d, slot::SCRATCH, "xent upstream", (n as u64 * 4).max(16));
        let inv = batch.gradient_scale(opts.get_reduction());
        let (scale, per_row) = match upstream {
            Upstream::Scalar(g) => (g * inv, 0),
            Upstream::PerRow(g) => {
                self.queue.write_buffer(&up, 0, bytemuck::cast_slice(g));
                (inv, 1)
            }
            Upstream::PerElement(_) => unreachable!("refused above"),
        };
        let params = workspace.uniform(d, slot::PARAMS, "xent params", params_stride(&self.limits));
        let bg = bind_ranges(
            d,
            &self.kernels.backward,
            &params,
            &[
                shard.logits.range(bytes),
                shard.targets.range(n as u64 * 4),
                (&stats, 0, n as u64 * 8),
                (&norm, 0, 16),
                grad.range(bytes),
                (&weights, 0, weights.size()),
                (&up, 0, up.size()),
            ],
        );
        let wgs = (n * blocks) as u64;
        let width = shard.columns.len();
        let kopts = KernelOpts::new(opts, v).for_batch(&batch, opts);
        let p = BackwardParams {
            rows: n as u32,
            row_stride: width as u32,
            cols: width as u32,
            col_base: shard.columns.start as u32,
            block_cols: SPLIT_BLOCK_COLS as u32,
            blocks: blocks as u32,
            row_base: 0,
            groups_x: groups_x(wgs, self.limits.max_compute_workgroups_per_dimension),
            scale,
            grad_mode: GradMode::Separate as u32,
            ignore_index: device_ignore_index(opts),
            classes: v as u32,
            per_row,
            ..bytemuck::Zeroable::zeroed()
        }
        .with_opts(&kopts);
        let mut rec = Recorder::into_encoder(encoder, &self.limits);
        rec.dispatch(&self.kernels.backward, &bg, &p, wgs);
        rec.write_params(&self.queue, &params);
        Ok(())
    }
}

/// The options' `ignore_index` as the kernels compare it with the device's i32 targets
/// (an index beyond i32 matches no target, as none can hold it).
fn device_ignore_index(opts: &LossOptions) -> i32 {
    opts.get_ignore_index().clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32
}
