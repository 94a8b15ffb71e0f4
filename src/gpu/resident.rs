//! The device-resident API, for engines whose logits and targets already live in GPU
//! buffers: xent records its passes into the caller's `CommandEncoder`, reads the
//! caller's buffers in place (no copies), and returns device buffers with the results.
//! Nothing is read back unless asked ([`GpuContext::read_device_loss`]).

use crate::error::{Error, Result};
use crate::options::{LossOptions, Reduction};

use super::buffers::{Recorder, bind_ranges, groups_x, params_stride};
use super::context::GpuContext;
use super::kernels::{ElemFormat, GradMode, KernelOpts, NO_INDEX, RowParams, WeightParams, rows_layout};
use super::plan::SPLIT_BLOCK_COLS;
use super::stream::{RowGrid, record_row_grid, reduce_levels};

/// A whole-buffer binding range of at least `bytes`.
fn whole(b: &wgpu::Buffer, bytes: u64) -> (&wgpu::Buffer, u64, u64) {
    (b, 0, bytes.max(16).min(b.size()))
}

/// A batch in the caller's GPU buffers.
#[derive(Clone, Copy, Debug)]
pub struct DeviceBatch<'a> {
    /// f32 logits [rows, classes], row major, at `logits_offset` bytes (a multiple of
    /// `min_storage_buffer_offset_alignment`). Needs `BufferUsages::STORAGE`.
    pub logits: &'a wgpu::Buffer,
    /// Byte offset of the logits.
    pub logits_offset: u64,
    /// i32 class indices \[rows\] at `targets_offset`. Rows whose target equals
    /// `ignore_index`, or lies outside [0, classes), are ignored (loss 0, gradient 0):
    /// the device cannot report a bad target, so validate on the host if that matters.
    pub targets: &'a wgpu::Buffer,
    /// Byte offset of the targets.
    pub targets_offset: u64,
    /// Rows N.
    pub rows: usize,
    /// Classes V.
    pub classes: usize,
    /// The ignore index.
    pub ignore_index: i32,
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

impl GpuContext {
    /// Records the loss (and gradient) of a batch held in the caller's buffers into the
    /// caller's encoder. Forward and, for `mean` with a gradient, a separate backward pass
    /// that reads the denominator reduced on the device: 2 reads + 1 write of the logits,
    /// as in the fused host path.
    pub fn record_cross_entropy(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        batch: &DeviceBatch<'_>,
        opts: &LossOptions,
        gradient: DeviceGradient<'_>,
    ) -> Result<DeviceLoss> {
        self.scoped(|| self.record_inner(encoder, batch, opts, gradient))
    }

    fn record_inner(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        batch: &DeviceBatch<'_>,
        opts: &LossOptions,
        gradient: DeviceGradient<'_>,
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
        let new_buffer = |label: &str, bytes: u64| {
            d.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes.max(16).next_multiple_of(16),
                usage: U::STORAGE | U::COPY_SRC | U::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let rows = n.max(1) as u64;
        let row_loss = new_buffer("xent row_loss", rows * 4);
        let lse = new_buffer("xent lse", rows * 4);
        let weight = new_buffer("xent row_weight", rows * 4);
        let stats = new_buffer("xent row_stats", rows * 8);
        let loss = new_buffer("xent loss", 8);
        let dummy = new_buffer("xent unused", 16);
        // The gradient's denominator: 1, `n_items`, or (copied in below) the weighted count
        // of non-ignored rows for `mean`.
        let n_items = opts.get_n_items().filter(|_| reduction == Reduction::Mean);
        let norm_init = n_items.map_or(1.0, |x| x as f32);
        let norm = d.create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent norm"),
            size: 16,
            usage: U::STORAGE | U::COPY_DST | U::COPY_SRC,
            mapped_at_creation: true,
        });
        norm.slice(..)
            .get_mapped_range_mut()
            .map_err(|e| Error::Gpu(e.to_string()))?
            .copy_from_slice(bytemuck::cast_slice(&[norm_init, 0.0, 0.0, 0.0]));
        norm.unmap();
        // The class weights (a dummy without them), and `n_items` as the denominator.
        let class_weights = d.create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent class weights"),
            size: (v as u64 * 4).max(16).next_multiple_of(16),
            usage: U::STORAGE | U::COPY_DST,
            mapped_at_creation: true,
        });
        if let Some(w) = opts.get_weights() {
            class_weights
                .slice(..)
                .get_mapped_range_mut()
                .map_err(|e| Error::Gpu(e.to_string()))?
                .slice(..w.len() * 4)
                .copy_from_slice(bytemuck::cast_slice(w));
        }
        class_weights.unmap();
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
        let scratch = new_buffer("xent scratch", loss_levels.extent * 4);

        let chunks = n.div_ceil(rows_per_chunk);
        let blocks = (chunks + 4 + count_levels.levels.len() + loss_levels.levels.len()) as u64;
        let mut _scratch = Vec::new();
        let params = d.create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent params"),
            size: blocks * params_stride(&self.limits),
            usage: U::UNIFORM | U::COPY_DST,
            mapped_at_creation: false,
        });

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
            let partials = new_buffer("xent partials", (n * bpr * 32) as u64);
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
            _scratch.push(partials);
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
            _scratch: [weight, stats, scratch, params, dummy, norm].into_iter().chain(_scratch).collect(),
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
