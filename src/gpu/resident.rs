//! The device-resident API, for engines whose logits and targets already live in GPU
//! buffers: xent records its passes into the caller's `CommandEncoder`, reads the
//! caller's buffers in place (no copies), and returns device buffers with the results.
//! Nothing is read back unless asked ([`GpuContext::read_device_loss`]).

use crate::error::{Error, Result};
use crate::options::{LossOptions, Reduction};
use crate::problem::{Cell, Dtype, LabelKind, Output};

use super::buffers::{Recorder, Slot, bind_ranges, groups_x, params_stride};
use super::context::GpuContext;
use super::grid::{RowGrid, record_row_grid};
use super::kernels::{ElemFormat, GradMode, KernelOpts, NO_INDEX, NarrowParams, RowParams, WeightParams};
use super::reduce::reduce_levels;
use super::tuning::{SPLIT_BLOCK_COLS, rows_layout};

/// A whole-buffer binding range of at least `bytes`.
fn whole(b: &wgpu::Buffer, bytes: u64) -> (&wgpu::Buffer, u64, u64) {
    (b, 0, bytes.max(16).min(b.size()))
}

/// A problem in the caller's GPU buffers: the device-resident twin of
/// [`crate::Problem`]. Every buffer needs `BufferUsages::STORAGE`; every offset is in bytes
/// and a multiple of `min_storage_buffer_offset_alignment`.
#[derive(Clone, Copy, Debug)]
pub struct DeviceProblem<'a> {
    /// The logits [rows, classes], row major.
    pub logits: DeviceLogits<'a>,
    /// Rows N.
    pub rows: usize,
    /// Classes V.
    pub classes: usize,
    /// The labels.
    pub labels: DeviceLabels<'a>,
    /// Where the gradient goes.
    pub gradient: DeviceGradient<'a>,
    /// Fused, or a separate backward.
    pub mode: DeviceMode<'a>,
}

/// How a device problem is evaluated: the twin of [`crate::Mode`].
#[derive(Clone, Copy, Debug, Default)]
pub enum DeviceMode<'a> {
    /// The loss (and the gradient, if asked) in one fused pass.
    #[default]
    Fused,
    /// A separate backward from the per-row LSE a forward saved, times the upstream
    /// gradient (f32 buffers; `upstream: None` for an upstream gradient of 1).
    Backward {
        /// The saved LSE \[rows\].
        lse: &'a wgpu::Buffer,
        /// Byte offset of the LSE.
        lse_offset: u64,
        /// One upstream value per row, or `None`.
        upstream: Option<(&'a wgpu::Buffer, u64)>,
    },
}

/// Logits in a caller's buffer.
#[derive(Clone, Copy, Debug)]
pub struct DeviceLogits<'a> {
    /// The buffer.
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset.
    pub offset: u64,
    /// The element type.
    pub dtype: Dtype,
}

/// Labels in a caller's buffer.
#[derive(Clone, Copy, Debug)]
pub enum DeviceLabels<'a> {
    /// i32 class indices \[rows\].
    ClassesI32 {
        /// The buffer.
        buffer: &'a wgpu::Buffer,
        /// Byte offset.
        offset: u64,
    },
    /// i64 class indices \[rows\] (PyTorch's `long`), narrowed on the device.
    ClassesI64 {
        /// The buffer.
        buffer: &'a wgpu::Buffer,
        /// Byte offset.
        offset: u64,
    },
    /// f32 probabilities [rows, classes].
    Probabilities {
        /// The buffer.
        buffer: &'a wgpu::Buffer,
        /// Byte offset.
        offset: u64,
    },
    /// f32 binary targets [rows, classes].
    Binary {
        /// The buffer.
        buffer: &'a wgpu::Buffer,
        /// Byte offset.
        offset: u64,
    },
}

/// Where the device path writes the gradient.
#[derive(Clone, Copy, Debug)]
pub enum DeviceGradient<'a> {
    /// No gradient.
    None,
    /// Over the logits, in the caller's buffer.
    InPlace,
    /// Into `buffer` at `offset` bytes: f32 [rows, classes].
    Into {
        /// The buffer (needs `STORAGE`).
        buffer: &'a wgpu::Buffer,
        /// Byte offset (aligned like the logits).
        offset: u64,
    },
}

impl DeviceProblem<'_> {
    /// The coordinates of this problem in the support matrix.
    pub fn cell(&self) -> Cell {
        Cell {
            dtype: self.logits.dtype,
            labels: match self.labels {
                DeviceLabels::ClassesI32 { .. } | DeviceLabels::ClassesI64 { .. } => LabelKind::Classes,
                DeviceLabels::Probabilities { .. } => LabelKind::Probabilities,
                DeviceLabels::Binary { .. } => LabelKind::Binary,
            },
            output: match (self.mode, self.gradient) {
                (DeviceMode::Backward { .. }, _) => Output::Backward,
                (_, DeviceGradient::None) => Output::Loss,
                (_, DeviceGradient::InPlace) => Output::InPlace,
                (_, DeviceGradient::Into { .. }) => Output::IntoF32,
            },
        }
    }
}

/// The checked inputs of the fused class-index kernels on caller buffers.
struct DeviceBatch<'a> {
    logits: &'a wgpu::Buffer,
    logits_offset: u64,
    targets: &'a wgpu::Buffer,
    targets_offset: u64,
    rows: usize,
    classes: usize,
    /// The ignore index as the kernels compare it (targets outside [0, V) are ignored
    /// too).
    ignore_index: i32,
}

/// Results of a recorded evaluation, as device buffers (all `STORAGE | COPY_SRC`).
/// They are valid once the caller has submitted the encoder.
pub struct DeviceLoss {
    /// Per-row losses, f32 \[rows\].
    pub row_loss: wgpu::Buffer,
    /// Per-row log-sum-exp, f32 \[rows\].
    pub lse: wgpu::Buffer,
    /// The reduced loss at element 0 (f32), and the `mean` denominator (the number of
    /// non-ignored rows) at element 1. For [`Reduction::None`] element 0 is the sum.
    pub loss: wgpu::Buffer,
    /// Rows N.
    pub rows: usize,
    // Kept alive until the caller's commands have run.
    _scratch: Vec<wgpu::Buffer>,
}

/// The path's name in [`Error::Unsupported`].
const PATH: &str = "device-resident";

/// The buffers of device-resident recordings, owned by the caller and reused by every
/// [`GpuContext::record`] that is given it: repeated recordings of one shape create no
/// buffer. One workspace per recording in flight — the results of a recording live in
/// the workspace until the next recording that uses it, so submit (and read) one before
/// recording the next into the same workspace.
#[derive(Default)]
pub struct DeviceWorkspace {
    slots: [Slot; 13],
    allocations: u64,
}

impl DeviceWorkspace {
    /// A workspace with no buffers yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// Buffers this workspace has created so far.
    pub fn buffer_allocations(&self) -> u64 {
        self.allocations
    }
    /// Slot `i` with at least `bytes`, counting a new buffer.
    fn buffer(
        &mut self,
        device: &wgpu::Device,
        i: usize,
        label: &str,
        usage: wgpu::BufferUsages,
        bytes: u64,
    ) -> wgpu::Buffer {
        if self.slots[i].ensure(device, label, usage, bytes, u64::MAX) {
            self.allocations += 1;
        }
        self.slots[i].get().clone()
    }
}

/// Slots of a [`DeviceWorkspace`].
mod slot {
    pub const ROW_LOSS: usize = 0;
    pub const LSE: usize = 1;
    pub const WEIGHT: usize = 2;
    pub const STATS: usize = 3;
    pub const LOSS: usize = 4;
    pub const DUMMY: usize = 5;
    pub const NORM: usize = 6;
    pub const CLASS_WEIGHTS: usize = 7;
    pub const SCRATCH: usize = 8;
    pub const PARAMS: usize = 9;
    pub const PARTIALS: usize = 10;
    pub const NARROW: usize = 11;
    pub const NARROW_PARAMS: usize = 12;
}

impl GpuContext {
    /// Records the loss (and gradient) of a problem held in the caller's buffers into the
    /// caller's encoder: no copies of the logits, nothing read back
    /// ([`GpuContext::read_device_loss`] when the caller wants the value). Forward and,
    /// for `mean` with a gradient, the denominator reduced on the device before the fused
    /// kernel: 2 reads + 1 write of the logits, as the fused host path.
    ///
    /// Takes f32 logits with i32 or i64 class indices, the gradient none, in place or
    /// into a caller buffer, every class-index option. Targets the device cannot range
    /// check are ignored rows (validate on the host if that matters). Other cells of the
    /// support matrix are [`Error::Unsupported`] on this path for now (README, "Library"):
    /// half-precision logits, probability and binary targets, a separate backward
    /// ([`DeviceMode::Backward`]), and
    /// z-loss with class weights under `mean` without `n_items` (its two denominators).
    pub fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        problem: &DeviceProblem<'_>,
        opts: &LossOptions,
        workspace: &mut DeviceWorkspace,
    ) -> Result<DeviceLoss> {
        let unsupported = |why: &str| Error::Unsupported {
            path: PATH.into(),
            cell: problem.cell().to_string(),
            why: why.into(),
        };
        if matches!(problem.mode, DeviceMode::Backward { .. }) {
            return Err(unsupported(
                "the device path records fused evaluations; use the host API's backward",
            ));
        }
        if problem.logits.dtype != Dtype::F32 {
            return Err(unsupported("the device path reads f32 logits; use the host API for half precision"));
        }
        let (targets, targets_offset, wide) = match problem.labels {
            DeviceLabels::ClassesI32 { buffer, offset } => (buffer, offset, false),
            DeviceLabels::ClassesI64 { buffer, offset } => (buffer, offset, true),
            DeviceLabels::Probabilities { .. } | DeviceLabels::Binary { .. } => {
                return Err(unsupported("the device path takes class indices; use the host API"));
            }
        };
        if opts.get_z_loss() > 0.0
            && opts.get_weights().is_some()
            && opts.get_reduction() == Reduction::Mean
            && opts.get_n_items().is_none()
        {
            return Err(unsupported(
                "z-loss with class weights under mean divides by two denominators the device path does not \
                 reduce yet; give n_items",
            ));
        }
        if opts.get_pos_weight().is_some() {
            return Err(Error::InvalidOption("pos_weight applies to binary cross-entropy only".into()));
        }
        self.scoped(|| {
            let ignore = opts.get_ignore_index();
            let (targets, targets_offset, ignore_index) = if wide {
                let narrow =
                    self.narrow_targets(encoder, targets, targets_offset, problem.rows, ignore, workspace)?;
                (narrow, 0, -1)
            } else {
                // An ignore_index no i32 holds matches no i32 target; -1 is ignored anyway.
                (targets.clone(), targets_offset, i32::try_from(ignore).unwrap_or(-1))
            };
            let batch = DeviceBatch {
                logits: problem.logits.buffer,
                logits_offset: problem.logits.offset,
                targets: &targets,
                targets_offset,
                rows: problem.rows,
                classes: problem.classes,
                ignore_index,
            };
            self.record_inner(encoder, &batch, opts, problem.gradient, workspace)
        })
    }

    /// Records the narrowing of `rows` i64 targets to a new i32 buffer.
    fn narrow_targets(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        wide: &wgpu::Buffer,
        offset: u64,
        rows: usize,
        ignore_index: i64,
        ws: &mut DeviceWorkspace,
    ) -> Result<wgpu::Buffer> {
        use wgpu::BufferUsages as U;
        let bytes = rows as u64 * 8;
        if offset + bytes > wide.size() {
            return Err(Error::Shape {
                what: format!("targets buffer (bytes from offset {offset})"),
                got: wide.size().saturating_sub(offset) as usize,
                expected: bytes as usize,
            });
        }
        let narrow = ws.buffer(
            &self.device,
            slot::NARROW,
            "xent narrowed targets",
            U::STORAGE | U::COPY_SRC | U::COPY_DST,
            rows as u64 * 4,
        );
        let params = ws.buffer(
            &self.device,
            slot::NARROW_PARAMS,
            "xent narrow params",
            U::UNIFORM | U::COPY_DST,
            params_stride(&self.limits),
        );
        let wg = self.kernels.workgroup_size;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let groups = (rows as u64).div_ceil(u64::from(wg)).max(1);
        let bg = bind_ranges(
            &self.device,
            &self.kernels.narrow,
            &params,
            &[(wide, offset, bytes.max(8)), whole(&narrow, narrow.size())],
        );
        let bits = ignore_index as u64;
        let p = NarrowParams {
            rows: rows as u32,
            groups_x: groups_x(groups, max_dim),
            ignore_lo: bits as u32,
            ignore_hi: (bits >> 32) as u32,
        };
        let mut rec = Recorder::into_encoder(encoder, &self.limits);
        rec.dispatch(&self.kernels.narrow, &bg, &p, groups);
        rec.write_params(&self.queue, &params);
        Ok(narrow)
    }

    fn record_inner(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        batch: &DeviceBatch<'_>,
        opts: &LossOptions,
        gradient: DeviceGradient<'_>,
        ws: &mut DeviceWorkspace,
    ) -> Result<DeviceLoss> {
        let (n, v) = (batch.rows, batch.classes);
        if v == 0 {
            return Err(Error::InvalidOption("classes must be at least 1".into()));
        }
        opts.validate(v)?;
        let reduction = opts.get_reduction();
        let kopts = KernelOpts::new(opts, v);
        let align = u64::from(self.limits.min_storage_buffer_offset_alignment);
        let bind_cap = self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size);
        let row_bytes = v as u64 * 4;
        let total = n as u64 * row_bytes;
        let check = |what: &str, buffer: &wgpu::Buffer, offset: u64, bytes: u64| -> Result<()> {
            if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(Error::InvalidOption(format!("{what} buffer needs BufferUsages::STORAGE")));
            }
            if !offset.is_multiple_of(align) {
                return Err(Error::InvalidOption(format!(
                    "{what} offset {offset} is not a multiple of min_storage_buffer_offset_alignment ({align})"
                )));
            }
            if offset + bytes > buffer.size() {
                return Err(Error::Shape {
                    what: format!("{what} buffer (bytes from offset {offset})"),
                    got: buffer.size().saturating_sub(offset) as usize,
                    expected: bytes as usize,
                });
            }
            Ok(())
        };
        check("logits", batch.logits, batch.logits_offset, total)?;
        check("targets", batch.targets, batch.targets_offset, n as u64 * 4)?;
        if let DeviceGradient::Into { buffer, offset } = gradient {
            check("gradient", buffer, offset, total)?;
        }
        if n as u64 * 8 > bind_cap {
            return Err(Error::TooLarge {
                what: format!("per-row results of {n} rows"),
                needed: n as u64 * 8,
                limit: bind_cap,
                hint: "record the batch in parts".into(),
            });
        }
        // Chunks of whole rows, each bound at an aligned offset of the caller's buffer.
        let gcd = |mut a: u64, mut b: u64| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let row_quantum = align / gcd(row_bytes, align);
        let mut rows_per_chunk = (bind_cap / row_bytes) / row_quantum * row_quantum;
        let wg = self.kernels.workgroup_size;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let (threads_per_row, cached) = rows_layout(v as u64, &self.tuning);
        let rows_per_group = u64::from(wg / threads_per_row);
        let max_rows = u64::from(max_dim).pow(2) * rows_per_group;
        rows_per_chunk = rows_per_chunk.min(max_rows / row_quantum * row_quantum);
        if rows_per_chunk == 0 && n > 0 {
            return Err(Error::TooLarge {
                what: format!("{row_quantum} rows of {v} classes (one aligned chunk)"),
                needed: row_quantum * row_bytes,
                limit: bind_cap,
                hint: "rows this long are supported for host arrays (split into column pieces), not on the device path".into(),
            });
        }
        let rows_per_chunk = rows_per_chunk.max(1) as usize;

        use wgpu::BufferUsages as U;
        let d = &self.device;
        let st = U::STORAGE | U::COPY_SRC | U::COPY_DST;
        let rows = n.max(1) as u64;
        let row_loss = ws.buffer(d, slot::ROW_LOSS, "xent row_loss", st, rows * 4);
        let lse = ws.buffer(d, slot::LSE, "xent lse", st, rows * 4);
        let weight = ws.buffer(d, slot::WEIGHT, "xent row_weight", st, rows * 4);
        let stats = ws.buffer(d, slot::STATS, "xent row_stats", st, rows * 8);
        let loss = ws.buffer(d, slot::LOSS, "xent loss", st, 8);
        let dummy = ws.buffer(d, slot::DUMMY, "xent unused", st, 16);
        // The gradient's denominator: 1, `n_items`, or (copied in below) the weighted count
        // of non-ignored rows for `mean`. Written through the queue: in place before the
        // caller's next submission, which runs this recording.
        let n_items = opts.get_n_items().filter(|_| reduction == Reduction::Mean);
        let norm_init = n_items.map_or(1.0, |x| x as f32);
        let norm = ws.buffer(d, slot::NORM, "xent norm", st, 16);
        self.queue.write_buffer(&norm, 0, bytemuck::cast_slice(&[norm_init, 0.0, 0.0, 0.0]));
        // The class weights (a dummy without them).
        let class_weights = ws.buffer(d, slot::CLASS_WEIGHTS, "xent class weights", st, v as u64 * 4);
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(&class_weights, 0, bytemuck::cast_slice(w));
        }
        // Scratch: weights' levels first (the count), then the losses' levels, which
        // divide by the count for `mean`.
        let count_levels = reduce_levels(rows, 0, wg, max_dim, 1.0, NO_INDEX);
        let loss_src = count_levels.extent;
        let (divisor, divisor_index) = match reduction {
            Reduction::Mean => match n_items {
                Some(x) => (x as f32, NO_INDEX),
                None => (1.0, count_levels.result),
            },
            _ => (1.0, NO_INDEX),
        };
        let loss_levels = reduce_levels(rows, loss_src, wg, max_dim, divisor, divisor_index);
        let scratch = ws.buffer(d, slot::SCRATCH, "xent scratch", st, loss_levels.extent * 4);

        let chunks = n.div_ceil(rows_per_chunk);
        let blocks = (chunks + 4 + count_levels.levels.len() + loss_levels.levels.len()) as u64;
        let params = ws.buffer(
            d,
            slot::PARAMS,
            "xent params",
            U::UNIFORM | U::COPY_DST,
            blocks * params_stride(&self.limits),
        );

        let mut rec = Recorder::into_encoder(encoder, &self.limits);
        // 1. Row weights from the targets, and their sum (the `mean` denominator), before
        //    the fused kernel: a `mean` gradient is then scaled in the pass that makes it.
        let weights_bg = bind_ranges(
            d,
            &self.kernels.weights,
            &params,
            &[
                (batch.targets, batch.targets_offset, n as u64 * 4),
                whole(&weight, rows * 4),
                whole(&class_weights, class_weights.size()),
            ],
        );
        let groups = (n as u64).div_ceil(u64::from(wg));
        let p = WeightParams {
            rows: n as u32,
            groups_x: groups_x(groups, max_dim),
            classes: v as u32,
            ignore_index: batch.ignore_index,
            has_weights: kopts.has_weights,
            _pad: [0; 3],
        };
        rec.dispatch(&self.kernels.weights, &weights_bg, &p, groups);
        let reduce_bg = bind_ranges(d, &self.kernels.reduce, &params, &[whole(&scratch, scratch.size())]);
        rec.copy(&weight, 0, &scratch, 0, n as u64 * 4);
        count_levels.record(&mut rec, &self.kernels, &reduce_bg);
        if reduction == Reduction::Mean && n_items.is_none() {
            rec.copy(&scratch, u64::from(count_levels.result) * 4, &norm, 0, 4);
        }

        // 2. The fused kernel over chunks of whole rows, gradient included.
        let mode = match gradient {
            DeviceGradient::None => GradMode::None,
            DeviceGradient::InPlace => GradMode::InPlace,
            DeviceGradient::Into { .. } => GradMode::Separate,
        };
        // Few long rows: a (row × column block) grid of workgroups fills the device where
        // one workgroup per row would not.
        let grid = self.tuning.row_grid(n, v) && total <= bind_cap;
        if grid {
            let bpr = v.div_ceil(SPLIT_BLOCK_COLS);
            let partials = ws.buffer(d, slot::PARTIALS, "xent partials", st, (n * bpr * 32) as u64);
            let logits_range = (batch.logits, batch.logits_offset, total);
            let targets_range = (batch.targets, batch.targets_offset, n as u64 * 4);
            let partials_bg = bind_ranges(
                d,
                &self.kernels.partials,
                &params,
                &[
                    logits_range,
                    targets_range,
                    whole(&partials, partials.size()),
                    whole(&class_weights, class_weights.size()),
                ],
            );
            let merge_bg = bind_ranges(
                d,
                &self.kernels.merge,
                &params,
                &[
                    whole(&partials, partials.size()),
                    targets_range,
                    whole(&row_loss, rows * 4),
                    whole(&lse, rows * 4),
                    whole(&weight, rows * 4),
                    whole(&stats, rows * 8),
                    whole(&class_weights, class_weights.size()),
                ],
            );
            let grad_range = match gradient {
                DeviceGradient::Into { buffer, offset } => (buffer, offset, total),
                _ => (&dummy, 0, 16),
            };
            // The gradient's scale is the divisor the device reduced into `norm`.
            let backward_bg = bind_ranges(
                d,
                &self.kernels.backward,
                &params,
                &[
                    logits_range,
                    targets_range,
                    whole(&stats, rows * 8),
                    whole(&norm, 16),
                    grad_range,
                    whole(&class_weights, class_weights.size()),
                    whole(&norm, 16),
                ],
            );
            let grid =
                RowGrid { rows: n, classes: v, ignore_index: batch.ignore_index, grad_scale: 1.0, mode };
            record_row_grid(
                &mut rec,
                &self.kernels,
                [&partials_bg, &merge_bg, &backward_bg],
                grid,
                &kopts,
                max_dim,
            );
        }
        for c in 0..if grid { 0 } else { chunks } {
            let first = c * rows_per_chunk;
            let count = rows_per_chunk.min(n - first);
            let at = first as u64 * row_bytes;
            let bytes = count as u64 * row_bytes;
            let grad_range = match gradient {
                DeviceGradient::Into { buffer, offset } => (buffer, offset + at, bytes),
                _ => (&dummy, 0, 16),
            };
            let bg = bind_ranges(
                d,
                &self.kernels.rows,
                &params,
                &[
                    (batch.logits, batch.logits_offset + at, bytes),
                    (batch.targets, batch.targets_offset, n as u64 * 4),
                    whole(&row_loss, rows * 4),
                    whole(&lse, rows * 4),
                    grad_range,
                    whole(&stats, rows * 8),
                    whole(&norm, 16),
                    whole(&class_weights, class_weights.size()),
                ],
            );
            let groups = self.tuning.rows_workgroups((count as u64).div_ceil(rows_per_group));
            let p = RowParams {
                rows: count as u32,
                classes: v as u32,
                row_base: first as u32,
                groups_x: groups_x(groups, max_dim),
                grad_scale: 1.0,
                grad_mode: mode as u32,
                ignore_index: batch.ignore_index,
                threads_per_row,
                cached: u32::from(cached),
                ..bytemuck::Zeroable::zeroed()
            }
            .with_opts(&kopts);
            let pipeline =
                self.kernels.rows_variants.get(&self.device, ElemFormat::f32_for(v), kopts.features());
            rec.dispatch_pipeline(&pipeline, &bg, &p, groups);
        }

        // 3. The loss, reduced on the device (`mean` divides by the count in its last level).
        rec.copy(&row_loss, 0, &scratch, loss_src * 4, n as u64 * 4);
        loss_levels.record(&mut rec, &self.kernels, &reduce_bg);
        rec.copy(&scratch, u64::from(loss_levels.result) * 4, &loss, 0, 4);
        rec.copy(&scratch, u64::from(count_levels.result) * 4, &loss, 4, 4);
        rec.write_params(&self.queue, &params);
        Ok(DeviceLoss {
            row_loss,
            lse,
            loss,
            rows: n,
            _scratch: vec![weight, stats, scratch, params, dummy, norm, class_weights],
        })
    }

    /// Reads the reduced loss of a recorded evaluation back to the host (after the
    /// caller has submitted the encoder). An empty batch gives NaN for `mean` sums of 0/0.
    pub fn read_device_loss(&self, out: &DeviceLoss) -> Result<f32> {
        Ok(self.read_device_buffer(&out.loss, 1)?[0])
    }

    /// Reads `count` f32 values from the start of a result buffer (e.g.
    /// [`DeviceLoss::row_loss`]).
    pub fn read_device_buffer(&self, buffer: &wgpu::Buffer, count: usize) -> Result<Vec<f32>> {
        self.scoped(|| {
            let bytes = (count as u64 * 4).max(4);
            let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("xent read"),
                size: bytes.next_multiple_of(8),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            let mut enc = self.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
            let submission = self.queue.submit([enc.finish()]);
            let map = self.request_map(&staging, bytes);
            let mut out = Vec::new();
            self.finish_map(&staging, map, Some(submission), |b| {
                out = bytemuck::cast_slice::<u8, f32>(b)[..count].to_vec();
            })?;
            Ok(out)
        })
    }
}
