//! The device-resident API, for engines whose logits and targets already live in GPU
//! buffers: xent records its passes into the caller's `CommandEncoder`, reads the
//! caller's buffers in place (no copies of f32 inputs), and returns device buffers with
//! the results. Nothing is read back unless asked ([`GpuContext::read_device_loss`]).
//!
//! Every cell of the support matrix is recorded here: f32, f16 and bf16 logits × class
//! indices (i32, or i64 narrowed on the device), probability and binary targets × the
//! loss, the gradient into an f32 buffer, into a half buffer, in place, or a separate
//! backward. The kernels are those of the host paths, bound over the caller's buffers at
//! offsets, in chunks of whole rows (binary targets: of elements) within
//! `max_storage_buffer_binding_size`:
//! - class indices: `row_weights.wgsl` and a tree sum for the `mean` denominators, then the
//!   fused kernel (`cross_entropy_rows.wgsl`, or the row grid for few long rows), or the
//!   saved-LSE backward (`cross_entropy_backward.wgsl`); z-loss with class weights under
//!   `mean` reduces a second denominator (the counted rows) for its z-loss part;
//! - probabilities: `cross_entropy_soft.wgsl`; binary: `binary_cross_entropy.wgsl`.
//!
//! Half-precision logits with an even number of classes go to the fused kernel's half
//! readers as they are (WGSL `f16` with `SHADER_F16`, else unpacked from u32). Rows of
//! an odd number of classes start in the middle of a 32-bit word, and the other kernels
//! read f32 only: there `convert_half.wgsl` widens each chunk into an f32 scratch (any
//! element offset; one read of the halves, no host round trip), and writes a half
//! gradient back rounded once, keeping the neighbouring half of a shared word bit for
//! bit. A gradient in place of kernels that read their logits read-only (probabilities,
//! binary) goes through the same scratch.

use crate::error::{Error, Result};
use crate::options::{HalfFormat, LossOptions, Reduction, Upstream};
use crate::problem::{Cell, Dtype, Input, LabelKind, Output};

use super::binary::{BinaryPiece, Shape as BinaryShape, record_binary_piece};
use super::buffers::{Recorder, Slot, bind_ranges, groups_x, params_stride};
use super::context::GpuContext;
use super::grid::{RowGrid, record_row_grid};
use super::kernels::{
    CONVERT_BF16, CONVERT_COPY, CONVERT_NARROW, CONVERT_WIDEN, ConvertParams, ElemFormat, F_METRICS,
    GradMode, KernelOpts, NO_INDEX, NarrowParams, ROW_MAP_STATS, ROW_MAP_Z_SPLIT, RowMapParams, RowParams,
    SOFT_METRICS, WeightParams,
};
use super::metrics::{MetricLevels, RECORD_BYTES, check_spec, entry_words, metric_levels};
use super::reduce::reduce_levels;
use super::soft::{soft_flags, soft_params};
use super::tuning::{SPLIT_BLOCK_COLS, rows_layout};

/// A whole-buffer binding range of at least `bytes`.
fn whole(b: &wgpu::Buffer, bytes: u64) -> (&wgpu::Buffer, u64, u64) {
    (b, 0, bytes.max(16).min(b.size()))
}

/// `bytes` rounded up to whole 32-bit words (storage bindings are).
fn words(bytes: u64) -> u64 {
    bytes.next_multiple_of(4)
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

/// A caller's buffer from a byte offset: where a device problem's array starts. The
/// buffer needs `BufferUsages::STORAGE`; the offset is a multiple of
/// `min_storage_buffer_offset_alignment`.
#[derive(Clone, Copy, Debug)]
pub struct DeviceSlice<'a> {
    /// The buffer.
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset.
    pub offset: u64,
}

impl<'a> DeviceSlice<'a> {
    /// `buffer` from byte `offset`.
    pub fn new(buffer: &'a wgpu::Buffer, offset: u64) -> Self {
        Self { buffer, offset }
    }

    /// `bytes` from the offset, as a binding range.
    pub(super) fn range(self, bytes: u64) -> (&'a wgpu::Buffer, u64, u64) {
        (self.buffer, self.offset, bytes)
    }

    /// `bytes` from element `e0` of 4-byte elements, as a binding range.
    fn elems(self, e0: u64, bytes: u64) -> (&'a wgpu::Buffer, u64, u64) {
        (self.buffer, self.offset + e0 * 4, bytes)
    }
}

impl<'a> From<&'a wgpu::Buffer> for DeviceSlice<'a> {
    /// The whole buffer, from offset 0.
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        Self { buffer, offset: 0 }
    }
}

/// How a device problem is evaluated: the twin of [`crate::Mode`].
#[derive(Clone, Copy, Debug, Default)]
pub enum DeviceMode<'a> {
    /// The loss (and the gradient, if asked) in one fused pass.
    #[default]
    Fused,
    /// A separate backward: the gradient alone (into [`DeviceProblem::gradient`], which
    /// must not be [`DeviceGradient::None`]), times the upstream gradient. Cross-entropy
    /// (class indices, probabilities) starts from the per-row LSE a forward saved; binary
    /// cross-entropy recomputes from the logits and takes no LSE.
    Backward {
        /// The saved LSE, f32 \[rows\] (`None` for binary targets).
        lse: Option<DeviceSlice<'a>>,
        /// The upstream gradient.
        upstream: DeviceUpstream<'a>,
    },
}

/// The upstream gradient of a device backward: the twin of [`crate::Upstream`].
#[derive(Clone, Copy, Debug)]
pub enum DeviceUpstream<'a> {
    /// One value for the whole loss (1 for the gradient of the loss itself).
    Scalar(f32),
    /// f32 \[rows\], one per row (cross-entropy under `none`).
    PerRow(DeviceSlice<'a>),
    /// f32 [rows, classes], one per element (binary targets under `none`).
    PerElement(DeviceSlice<'a>),
}

/// Logits in a caller's buffer.
#[derive(Clone, Copy, Debug)]
pub struct DeviceLogits<'a> {
    /// The buffer.
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset.
    pub offset: u64,
    /// The element type: f32, or f16 / bf16 bits packed two per 32-bit word (the buffer
    /// holds N·V of them from the offset, rounded up to a whole word).
    pub dtype: Dtype,
}

/// Labels in a caller's buffer.
#[derive(Clone, Copy, Debug)]
pub enum DeviceLabels<'a> {
    /// i32 class indices \[rows\].
    ClassesI32(DeviceSlice<'a>),
    /// i64 class indices \[rows\] (PyTorch's `long`), narrowed on the device.
    ClassesI64(DeviceSlice<'a>),
    /// f32 probabilities [rows, classes].
    Probabilities(DeviceSlice<'a>),
    /// f32 binary targets [rows, classes].
    Binary(DeviceSlice<'a>),
}

/// Where the device path writes the gradient.
#[derive(Clone, Copy, Debug)]
pub enum DeviceGradient<'a> {
    /// No gradient.
    None,
    /// Over the logits, in the caller's buffer, in their type (a half gradient rounded
    /// once from f32).
    InPlace,
    /// f32 [rows, classes] into the slice (aligned like the logits).
    Into(DeviceSlice<'a>),
    /// Into the slice (aligned like the logits) in the half-precision logits' own type
    /// (rounded once), [rows, classes] packed two per word: the twin of
    /// [`crate::Gradient::IntoHalf`].
    IntoHalf(DeviceSlice<'a>),
}

impl DeviceProblem<'_> {
    /// The coordinates of this problem in the support matrix.
    pub fn cell(&self) -> Cell {
        Cell {
            input: Input::Logits,
            dtype: self.logits.dtype,
            labels: match self.labels {
                DeviceLabels::ClassesI32(_) | DeviceLabels::ClassesI64(_) => LabelKind::Classes,
                DeviceLabels::Probabilities(_) => LabelKind::Probabilities,
                DeviceLabels::Binary(_) => LabelKind::Binary,
            },
            output: match (self.mode, self.gradient) {
                (DeviceMode::Backward { .. }, _) => Output::Backward,
                (_, DeviceGradient::None) => Output::Loss,
                (_, DeviceGradient::InPlace) => Output::InPlace,
                (_, DeviceGradient::Into(_)) => Output::IntoF32,
                (_, DeviceGradient::IntoHalf(_)) => Output::IntoHalf,
            },
        }
    }
}

/// Results of a recorded evaluation, as device buffers (all `STORAGE | COPY_SRC`).
/// They are valid once the caller has submitted the encoder. A backward writes the
/// gradient alone: after one, these buffers hold nothing of use.
pub struct DeviceLoss {
    /// Per-row losses, f32 \[rows\] (ignored rows 0). Binary targets: under `none`, the
    /// element losses f32 [rows, classes]; not written under `mean` and `sum`.
    pub row_loss: wgpu::Buffer,
    /// Per-row log-sum-exp, f32 \[rows\] (not written for binary targets).
    pub lse: wgpu::Buffer,
    /// The reduced loss at element 0 (f32), and at element 1 the `mean` denominator of
    /// the cross-entropy part before `n_items`: Σ w_y over the non-ignored rows (their
    /// number without class weights) for class indices, N for probabilities, N·V for
    /// binary targets. For [`Reduction::None`] element 0 is the sum.
    pub loss: wgpu::Buffer,
    /// Rows N.
    pub rows: usize,
    /// The evaluation metrics, when the options asked for them (read them with
    /// [`GpuContext::read_device_metrics`]).
    pub metrics: Option<DeviceMetrics>,
    // Kept alive until the caller's commands have run.
    _scratch: Vec<wgpu::Buffer>,
}

/// The evaluation metrics of a device-resident recording, reduced on the device.
pub struct DeviceMetrics {
    /// What was asked.
    pub spec: crate::MetricsSpec,
    /// The sums at the start (u32 words: counted rows, correct, 8 top-k counts, the nll
    /// and entropy sums with their Kahan compensations as f32 bits, 2 zeros, then per
    /// calibration bin count, correct, confidence sum, compensation); `None` for an
    /// empty batch.
    pub sums: Option<wgpu::Buffer>,
    /// Each row's record (two vec4: pred and count above the target as integer bits,
    /// confidence, entropy; nll, target class as integer bits, 0, 0); `None` for an
    /// empty batch.
    pub records: Option<wgpu::Buffer>,
}

/// The buffers of device-resident recordings, owned by the caller and reused by every
/// [`GpuContext::record`] that is given it: repeated recordings of one shape create no
/// buffer. One workspace per recording in flight — the results of a recording live in
/// the workspace until the next recording that uses it, so submit (and read) one before
/// recording the next into the same workspace.
#[derive(Default)]
pub struct DeviceWorkspace {
    slots: [Slot; slot::COUNT],
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
    /// Device bytes of the buffers this workspace holds now.
    pub fn bytes(&self) -> u64 {
        self.slots.iter().map(Slot::bytes).sum()
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
    /// The f32 chunks of `chunk_bytes` a kernel that reads f32 only needs: the widened
    /// half logits, and the gradient on its way to a half or in-place destination
    /// (16 bytes where `f` needs none).
    fn chunk_scratch(&mut self, device: &wgpu::Device, f: &Frame<'_>, chunk_bytes: u64) -> [wgpu::Buffer; 2] {
        let bytes = |on: bool| if on { chunk_bytes } else { 16 };
        [
            self.storage(device, slot::WIDE, "xent wide logits", bytes(f.half.is_some())),
            self.storage(device, slot::GRAD, "xent gradient chunk", bytes(f.via_scratch())),
        ]
    }
    /// A uniform buffer (parameter blocks) of slot `i` with at least `bytes`.
    pub(super) fn uniform(
        &mut self,
        device: &wgpu::Device,
        i: usize,
        label: &str,
        bytes: u64,
    ) -> wgpu::Buffer {
        use wgpu::BufferUsages as U;
        self.buffer(device, i, label, U::UNIFORM | U::COPY_DST, bytes)
    }
    /// A storage buffer of slot `i` with at least `bytes`.
    pub(super) fn storage(
        &mut self,
        device: &wgpu::Device,
        i: usize,
        label: &str,
        bytes: u64,
    ) -> wgpu::Buffer {
        use wgpu::BufferUsages as U;
        self.buffer(device, i, label, U::STORAGE | U::COPY_SRC | U::COPY_DST, bytes)
    }
}

/// Slots of a [`DeviceWorkspace`].
pub(super) mod slot {
    pub const ROW_LOSS: usize = 0;
    pub const LSE: usize = 1;
    pub const WEIGHT: usize = 2;
    pub const STATS: usize = 3;
    pub const LOSS: usize = 4;
    /// Bound where a kernel writes nothing (read-write bindings only).
    pub const DUMMY: usize = 5;
    pub const NORM: usize = 6;
    pub const CLASS_WEIGHTS: usize = 7;
    pub const SCRATCH: usize = 8;
    pub const PARAMS: usize = 9;
    pub const PARTIALS: usize = 10;
    pub const NARROW: usize = 11;
    pub const NARROW_PARAMS: usize = 12;
    /// 1 per counted row, 0 per ignored one.
    pub const COUNTED: usize = 13;
    /// The cross-entropy and z-loss parts of the row losses.
    pub const Z_PARTS: usize = 14;
    /// A chunk of half logits widened to f32.
    pub const WIDE: usize = 15;
    /// A chunk's f32 gradient on its way to a half or in-place destination.
    pub const GRAD: usize = 16;
    /// Bound where a kernel reads nothing (read-only bindings only).
    pub const DUMMY_RO: usize = 17;
    pub const POS_WEIGHT: usize = 18;
    pub const SUMS: usize = 19;
    /// Bound where the soft kernel writes no metric records.
    pub const NO_METRICS: usize = 20;
    /// Each row's metric record.
    pub const RECORDS: usize = 21;
    /// The metrics' sums (entry 0), then the reduction's scratch.
    pub const METRIC_SUMS: usize = 22;
    pub const COUNT: usize = 23;
}

/// The checked problem, as every kind's recording takes it.
struct Frame<'a> {
    n: usize,
    v: usize,
    logits: DeviceSlice<'a>,
    half: Option<HalfFormat>,
    gradient: DeviceGradient<'a>,
    align: u64,
    bind_cap: u64,
    wg: u32,
    max_dim: u32,
}

impl<'a> Frame<'a> {
    /// Whether the gradient of a kernel that reads its logits read-only (probabilities,
    /// binary) goes through the workspace's f32 chunk (in place, or into a half buffer).
    fn via_scratch(&self) -> bool {
        matches!(self.gradient, DeviceGradient::InPlace | DeviceGradient::IntoHalf(_))
    }

    /// What follows such a kernel's chunk for its gradient in the f32 chunk to reach the
    /// caller's destination.
    fn after_scratch(&self) -> After<'a> {
        match self.gradient {
            DeviceGradient::InPlace if self.half.is_some() => After::Narrow(self.logits),
            DeviceGradient::InPlace => After::Copy(self.logits),
            DeviceGradient::IntoHalf(grad) => After::Narrow(grad),
            _ => After::Nothing,
        }
    }

    /// Such a kernel's gradient binding for elements [e0, e0 + len): `dummy` without a
    /// gradient, the caller's f32 destination, else the f32 chunk `grad`.
    fn scratch_grad_range<'b>(
        &self,
        dummy: &'b wgpu::Buffer,
        grad: &'b wgpu::Buffer,
        e0: u64,
        len: u64,
    ) -> (&'b wgpu::Buffer, u64, u64)
    where
        'a: 'b,
    {
        match self.gradient {
            DeviceGradient::None => whole(dummy, 16),
            DeviceGradient::Into(dst) => dst.elems(e0, len * 4),
            _ => (grad, 0, len * 4),
        }
    }

    /// The most workgroups one dispatch takes (folded into 2D).
    fn max_groups(&self) -> u64 {
        u64::from(self.max_dim).pow(2)
    }

    /// Rows per chunk: whole rows whose bindings start at aligned offsets of the caller's
    /// buffers (`direct_row_bytes` a row in the narrowest of them), whose f32 logits or
    /// gradient fit one binding, at most `max_rows` (what one dispatch takes).
    fn rows_per_chunk(&self, direct_row_bytes: u64, max_rows: u64) -> Result<usize> {
        let gcd = |mut a: u64, mut b: u64| {
            while b != 0 {
                (a, b) = (b, a % b);
            }
            a
        };
        let quantum = self.align / gcd(direct_row_bytes, self.align);
        let row_bytes = self.v as u64 * 4;
        let rows = (self.bind_cap / row_bytes).min(max_rows) / quantum * quantum;
        if rows == 0 && self.n > 0 {
            return Err(Error::TooLarge {
                what: format!("{quantum} rows of {} classes (one aligned chunk)", self.v),
                needed: quantum * row_bytes,
                limit: self.bind_cap,
                hint: "rows this long are supported for host arrays (split into column pieces), not on the \
                       device path"
                    .into(),
            });
        }
        Ok(rows.max(1) as usize)
    }
}

/// What follows a chunk's kernel for its gradient to reach the caller's destination.
#[derive(Clone, Copy)]
enum After<'a> {
    Nothing,
    /// Round the f32 gradient in `src` into the 16-bit array of the slice.
    Narrow(DeviceSlice<'a>),
    /// Copy the f32 gradient in `src` over the f32 array of the slice.
    Copy(DeviceSlice<'a>),
}

impl GpuContext {
    /// Records the loss (and gradient) of a problem held in the caller's buffers into the
    /// caller's encoder, with nothing read back ([`GpuContext::read_device_loss`] when the
    /// caller wants the value): every cell of the support matrix — f32, f16 or bf16
    /// logits ([`DeviceLogits::dtype`]) × i32 or i64 class indices, probability or binary
    /// targets × the loss, the gradient into an f32 buffer, into a half buffer, in place
    /// (a half gradient rounded once), or a separate backward ([`DeviceMode::Backward`])
    /// — with every option of the kind (`ignore_index` from the options).
    ///
    /// Reductions happen on the device: for class indices the `mean` denominator Σ w_y is
    /// reduced from the targets before the fused kernel, so that the gradient is scaled
    /// in the pass that makes it (2 reads + 1 write of the logits, as the fused host
    /// path); with z-loss and class weights under `mean` without `n_items` a second
    /// denominator, the counted rows, divides the z-loss part of the loss and of the
    /// gradient (shared/docs/semantics.md). Class-index targets the device cannot range
    /// check are ignored rows (validate on the host if that matters). What
    /// [`DeviceLoss`] holds depends on the labels (binary: element losses under `none`).
    ///
    /// Half logits with an odd number of classes, and the kernels that read f32 only
    /// (probabilities, binary targets, the backward), widen each chunk into an f32
    /// scratch of the workspace on the device (module docs). Errors are typed: buffers
    /// without `STORAGE`, misaligned offsets, buffers too short for the shape, options
    /// that do not apply ([`Error::InvalidOption`], [`Error::Shape`]); rows longer than
    /// one storage binding are [`Error::TooLarge`] here (the host API splits them).
    pub fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        problem: &DeviceProblem<'_>,
        opts: &LossOptions,
        workspace: &mut DeviceWorkspace,
    ) -> Result<DeviceLoss> {
        let frame = self.check_device_problem(problem, opts)?;
        if frame.n == 0 {
            return Ok(self.empty_device_loss(problem, opts, workspace));
        }
        self.scoped(|| match problem.labels {
            DeviceLabels::ClassesI32(targets) => {
                self.record_classes(encoder, &frame, (targets, false), problem.mode, opts, workspace)
            }
            DeviceLabels::ClassesI64(targets) => {
                self.record_classes(encoder, &frame, (targets, true), problem.mode, opts, workspace)
            }
            DeviceLabels::Probabilities(probs) => {
                self.record_soft(encoder, &frame, probs, problem.mode, opts, workspace)
            }
            DeviceLabels::Binary(targets) => {
                self.record_binary(encoder, &frame, targets, problem.mode, opts, workspace)
            }
        })
    }

    /// Checks the problem's buffers, shape and options before anything is recorded.
    fn check_device_problem<'a>(&self, problem: &DeviceProblem<'a>, opts: &LossOptions) -> Result<Frame<'a>> {
        let (n, v) = (problem.rows, problem.classes);
        let bad = |m: String| Err(Error::InvalidOption(m));
        if v == 0 {
            return bad("classes must be at least 1".into());
        }
        let elems = (n as u64).checked_mul(v as u64).filter(|e| *e <= u64::MAX / 8).ok_or_else(|| {
            Error::Shape { what: "logits (rows × classes)".into(), got: n, expected: usize::MAX }
        })?;
        let half = problem.logits.dtype.half();
        let esize = if half.is_some() { 2 } else { 4 };
        let binary = matches!(problem.labels, DeviceLabels::Binary(_));
        if binary {
            opts.validate_binary(v)?;
        } else {
            opts.validate(v)?;
            if opts.get_pos_weight().is_some() {
                return bad("pos_weight applies to binary cross-entropy only".into());
            }
            if opts.get_metrics().is_some() && matches!(problem.mode, DeviceMode::Backward { .. }) {
                return bad(
                    "metrics come from a fused evaluation (the forward's row state), not a backward".into()
                );
            }
        }
        let align = u64::from(self.limits.min_storage_buffer_offset_alignment);
        let bind_cap = self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size);
        let check = |what: &str, DeviceSlice { buffer, offset }: DeviceSlice<'_>, bytes: u64| -> Result<()> {
            if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
                return Err(Error::InvalidOption(format!("{what} buffer needs BufferUsages::STORAGE")));
            }
            if !offset.is_multiple_of(align) {
                return Err(Error::InvalidOption(format!(
                    "{what} offset {offset} is not a multiple of min_storage_buffer_offset_alignment ({align})"
                )));
            }
            if offset.saturating_add(bytes) > buffer.size() {
                return Err(Error::Shape {
                    what: format!("{what} buffer (bytes from offset {offset})"),
                    got: buffer.size().saturating_sub(offset) as usize,
                    expected: bytes as usize,
                });
            }
            Ok(())
        };
        let logits = DeviceSlice::new(problem.logits.buffer, problem.logits.offset);
        check("logits", logits, words(elems * esize))?;
        match problem.labels {
            DeviceLabels::ClassesI32(targets) => check("targets", targets, n as u64 * 4)?,
            DeviceLabels::ClassesI64(targets) => check("targets", targets, n as u64 * 8)?,
            DeviceLabels::Probabilities(targets) | DeviceLabels::Binary(targets) => {
                check("targets", targets, elems * 4)?
            }
        }
        match problem.gradient {
            DeviceGradient::Into(grad) => check("gradient", grad, elems * 4)?,
            DeviceGradient::IntoHalf(grad) => {
                if half.is_none() {
                    return bad("DeviceGradient::IntoHalf writes the logits' half type; f32 logits take \
                         DeviceGradient::Into"
                        .into());
                }
                check("gradient", grad, words(elems * 2))?
            }
            DeviceGradient::None | DeviceGradient::InPlace => {}
        }
        if let DeviceMode::Backward { lse, upstream } = problem.mode {
            if matches!(problem.gradient, DeviceGradient::None) {
                return bad(
                    "a backward writes a gradient: give DeviceGradient::Into, IntoHalf or InPlace".into()
                );
            }
            match (lse, binary) {
                (Some(_), true) => {
                    return bad(
                        "binary cross-entropy's backward recomputes from the logits: give no LSE".into()
                    );
                }
                (None, false) => {
                    return bad("a cross-entropy backward needs the LSE its forward saved".into());
                }
                (Some(lse), false) => check("lse", lse, n as u64 * 4)?,
                (None, true) => {}
            }
            match (upstream, binary) {
                (DeviceUpstream::Scalar(_), _) => {}
                (DeviceUpstream::PerRow(up), false) => check("upstream", up, n as u64 * 4)?,
                (DeviceUpstream::PerElement(up), true) => check("upstream", up, elems * 4)?,
                (DeviceUpstream::PerRow(_), true) => {
                    return bad("binary cross-entropy takes a scalar or per-element upstream gradient".into());
                }
                (DeviceUpstream::PerElement(_), false) => {
                    return bad("cross-entropy takes a scalar or per-row upstream gradient".into());
                }
            }
        }
        if n as u64 * 8 > bind_cap {
            return Err(Error::TooLarge {
                what: format!("per-row results of {n} rows"),
                needed: n as u64 * 8,
                limit: bind_cap,
                hint: "record the batch in parts".into(),
            });
        }
        if binary && opts.get_reduction() == Reduction::None && elems * 4 > self.limits.max_buffer_size {
            return Err(Error::TooLarge {
                what: format!("element losses of {n} × {v}"),
                needed: elems * 4,
                limit: self.limits.max_buffer_size,
                hint: "record the batch in parts".into(),
            });
        }
        Ok(Frame {
            n,
            v,
            logits,
            half,
            gradient: problem.gradient,
            align,
            bind_cap,
            wg: self.kernels.workgroup_size,
            max_dim: self.limits.max_compute_workgroups_per_dimension,
        })
    }

    /// The results of an empty batch: `mean` 0/0 = NaN (0 with `n_items`), `sum` 0.
    fn empty_device_loss(
        &self,
        problem: &DeviceProblem<'_>,
        opts: &LossOptions,
        ws: &mut DeviceWorkspace,
    ) -> DeviceLoss {
        let d = &self.device;
        let value = match opts.get_reduction() {
            Reduction::Mean if opts.get_n_items().is_none() => f32::NAN,
            _ => 0.0,
        };
        let loss = ws.storage(d, slot::LOSS, "xent loss", 16);
        if !matches!(problem.mode, DeviceMode::Backward { .. }) {
            self.queue.write_buffer(&loss, 0, bytemuck::cast_slice(&[value, 0.0]));
        }
        DeviceLoss {
            row_loss: ws.storage(d, slot::ROW_LOSS, "xent row_loss", 16),
            lse: ws.storage(d, slot::LSE, "xent lse", 16),
            loss,
            rows: 0,
            metrics: opts
                .get_metrics()
                .filter(|_| !matches!(problem.mode, DeviceMode::Backward { .. }))
                .map(|spec| DeviceMetrics { spec: spec.clone(), sums: None, records: None }),
            _scratch: Vec::new(),
        }
    }

    /// Records `convert_half.wgsl` between elements [e0, e0 + len) of the caller's array at
    /// byte `offset` of `words` (16-bit elements; 32-bit for [`CONVERT_COPY`]) and the f32
    /// values at the start of `wide`.
    #[allow(clippy::too_many_arguments)]
    fn record_convert(
        &self,
        rec: &mut Recorder<'_>,
        params: &wgpu::Buffer,
        f: &Frame<'_>,
        DeviceSlice { buffer, offset }: DeviceSlice<'_>,
        e0: u64,
        len: u64,
        wide: &wgpu::Buffer,
        mode: u32,
    ) {
        let elem = if mode == CONVERT_COPY { 4 } else { 2 };
        let at = offset + e0 * elem;
        let start = offset + (e0 * elem) / f.align * f.align;
        let end = words(at + len * elem).min(buffer.size());
        let bg = bind_ranges(
            &self.device,
            &self.kernels.convert,
            params,
            &[(buffer, start, end - start), (wide, 0, (len * 4).max(4))],
        );
        let groups = len.div_ceil(u64::from(f.wg)).clamp(1, f.max_groups());
        let bf16 = if f.half == Some(HalfFormat::Bf16) { CONVERT_BF16 } else { 0 };
        let p = ConvertParams {
            first: ((at - start) / elem) as u32,
            count: len as u32,
            groups_x: groups_x(groups, f.max_dim),
            flags: mode | bf16,
        };
        rec.dispatch(&self.kernels.convert, &bg, &p, groups);
    }

    /// The f32 logits of elements [e0, e0 + len) for a kernel: the caller's range, or the
    /// half elements widened into `wide` (recorded here).
    #[allow(clippy::too_many_arguments)]
    fn chunk_logits<'b>(
        &self,
        rec: &mut Recorder<'_>,
        params: &wgpu::Buffer,
        f: &Frame<'b>,
        wide: &'b wgpu::Buffer,
        widened: bool,
        e0: u64,
        len: u64,
    ) -> (&'b wgpu::Buffer, u64, u64) {
        if widened {
            self.record_convert(rec, params, f, f.logits, e0, len, wide, CONVERT_WIDEN);
            (wide, 0, len * 4)
        } else {
            f.logits.elems(e0, len * 4)
        }
    }

    /// Records what follows a chunk's kernel so that its f32 gradient in `src` reaches
    /// the caller's destination.
    #[allow(clippy::too_many_arguments)]
    fn finish_gradient(
        &self,
        rec: &mut Recorder<'_>,
        params: &wgpu::Buffer,
        f: &Frame<'_>,
        after: After<'_>,
        src: &wgpu::Buffer,
        e0: u64,
        len: u64,
    ) {
        match after {
            After::Nothing => {}
            After::Narrow(to) => self.record_convert(rec, params, f, to, e0, len, src, CONVERT_NARROW),
            After::Copy(to) => self.record_convert(rec, params, f, to, e0, len, src, CONVERT_COPY),
        }
    }

    /// Records the narrowing of `rows` i64 targets to a new i32 buffer.
    fn narrow_targets(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        wide: DeviceSlice<'_>,
        rows: usize,
        ignore_index: i64,
        ws: &mut DeviceWorkspace,
    ) -> Result<wgpu::Buffer> {
        let bytes = rows as u64 * 8;
        let narrow = ws.storage(&self.device, slot::NARROW, "xent narrowed targets", rows as u64 * 4);
        let params =
            ws.uniform(&self.device, slot::NARROW_PARAMS, "xent narrow params", params_stride(&self.limits));
        let wg = self.kernels.workgroup_size;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let groups = (rows as u64).div_ceil(u64::from(wg)).max(1);
        let bg = bind_ranges(
            &self.device,
            &self.kernels.narrow,
            &params,
            &[wide.range(bytes.max(8)), whole(&narrow, narrow.size())],
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

    /// Class-index targets: the fused kernel, or the saved-LSE backward.
    /// The buffers of a recording's metrics over `f.n` rows — each row's record, and the
    /// sums (entry 0) with the scratch of the levels that reduce the records into it —
    /// and those levels.
    fn device_metric_buffers(
        &self,
        spec: &crate::MetricsSpec,
        f: &Frame<'_>,
        ws: &mut DeviceWorkspace,
    ) -> Result<(wgpu::Buffer, wgpu::Buffer, MetricLevels)> {
        check_spec(spec, self.path_name())?;
        let bytes = f.n as u64 * RECORD_BYTES;
        let levels = metric_levels(spec, f.n, true, 0, 1, Some(0), (f.wg, f.max_dim));
        let entries = u64::from(levels.extent) * entry_words(spec) as u64 * 4;
        if bytes.max(entries) > f.bind_cap {
            return Err(Error::Unsupported {
                path: self.path_name(),
                cell: format!("evaluation metrics of {} device-resident rows", f.n),
                why: format!(
                    "their records ({bytes} bytes) and sums ({entries} bytes) must each fit one binding ({} \
                     bytes); evaluate fewer rows a call",
                    f.bind_cap
                ),
            });
        }
        let d = &self.device;
        let records = ws.storage(d, slot::RECORDS, "xent row_metrics", bytes);
        let sums = ws.storage(d, slot::METRIC_SUMS, "xent metric sums", entries);
        Ok((records, sums, levels))
    }

    /// Records the reduction of the `rows` rows' records into the sums' entry 0.
    fn record_metric_sums(
        &self,
        rec: &mut Recorder<'_>,
        params: &wgpu::Buffer,
        rows: usize,
        spec: &crate::MetricsSpec,
        (records, sums, levels): &(wgpu::Buffer, wgpu::Buffer, MetricLevels),
    ) {
        // The bytes the levels use (the slots may be larger than a binding).
        let entries = u64::from(levels.extent) * entry_words(spec) as u64 * 4;
        let bg = bind_ranges(
            &self.device,
            &self.kernels.reduce_metrics,
            params,
            &[whole(records, rows as u64 * RECORD_BYTES), whole(sums, entries)],
        );
        levels.record(rec, &self.kernels, &bg);
    }

    fn record_classes(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        f: &Frame<'_>,
        (targets, wide_targets): (DeviceSlice<'_>, bool),
        mode: DeviceMode<'_>,
        opts: &LossOptions,
        ws: &mut DeviceWorkspace,
    ) -> Result<DeviceLoss> {
        let ignore = opts.get_ignore_index();
        let (targets, targets_offset, ignore_index) = if wide_targets {
            (self.narrow_targets(encoder, targets, f.n, ignore, ws)?, 0, -1)
        } else {
            // An ignore_index no i32 holds matches no i32 target; -1 is ignored anyway.
            (targets.buffer.clone(), targets.offset, i32::try_from(ignore).unwrap_or(-1))
        };
        let (n, v) = (f.n, f.v);
        let (wg, max_dim) = (f.wg, f.max_dim);
        let reduction = opts.get_reduction();
        let kopts = KernelOpts::new(opts, v);
        let backward = match mode {
            DeviceMode::Fused => None,
            DeviceMode::Backward { lse, upstream } => Some((lse.expect("checked: an LSE"), upstream)),
        };
        let n_items = opts.get_n_items().filter(|_| reduction == Reduction::Mean);
        // The z-loss part divides by the counted rows, the cross-entropy part by Σ w_y.
        let z_split = opts.get_z_loss() > 0.0
            && opts.get_weights().is_some()
            && reduction == Reduction::Mean
            && n_items.is_none();
        // Half logits go to the fused kernel's half readers when rows are whole words;
        // otherwise (odd V, or the backward, which reads f32) they are widened.
        let direct_half = f.half.is_some() && v.is_multiple_of(2) && backward.is_none();
        let widened = f.half.is_some() && !direct_half;
        let row_bytes = v as u64 * 4;
        let total = n as u64 * row_bytes;
        let (threads_per_row, cached) = rows_layout(v as u64, &self.tuning);
        let rows_per_group = u64::from(wg / threads_per_row);
        let blocks = v.div_ceil(SPLIT_BLOCK_COLS);
        let max_rows = match backward {
            Some(_) => f.max_groups() / blocks as u64,
            None => f.max_groups() * rows_per_group,
        };
        let direct_bytes = if direct_half { v as u64 * 2 } else { row_bytes };
        let rows_per_chunk = f.rows_per_chunk(direct_bytes, max_rows)?;
        // The metrics: the fused row kernel's, or the row grid's where the adapter has no
        // binding for the fused kernel's records (f32 rows within one binding).
        let metrics = opts.get_metrics().filter(|_| backward.is_none());
        let metric_bufs = metrics.map(|spec| self.device_metric_buffers(spec, f, ws)).transpose()?;
        let grid_fits = backward.is_none() && f.half.is_none() && total <= f.bind_cap;
        let metrics_on_grid = metrics.is_some() && self.kernels.rows_metrics.is_none();
        if metrics_on_grid && !grid_fits {
            return Err(self.no_metrics_binding());
        }
        let grid = grid_fits && (metrics_on_grid || self.tuning.row_grid(n, v));
        let chunks = if grid { 0 } else { n.div_ceil(rows_per_chunk) };

        let d = &self.device;
        let rows = n as u64;
        let row_loss = ws.storage(d, slot::ROW_LOSS, "xent row_loss", rows * 4);
        let lse = ws.storage(d, slot::LSE, "xent lse", rows * 4);
        let weight = ws.storage(d, slot::WEIGHT, "xent row_weight", rows * 4);
        let stats = ws.storage(d, slot::STATS, "xent row_stats", rows * 8);
        let loss = ws.storage(d, slot::LOSS, "xent loss", 16);
        let dummy = ws.storage(d, slot::DUMMY, "xent unused", 16);
        let wide = ws.storage(
            d,
            slot::WIDE,
            "xent wide logits",
            if widened { rows_per_chunk.min(n) as u64 * row_bytes } else { 16 },
        );
        // The gradient's denominator: 1, `n_items`, or (copied in below) the weighted count
        // of non-ignored rows for `mean`; then the factor of the z-loss gradient (1, or
        // Σ w_y over the counted rows, copied in below). Written through the queue: in
        // place before the caller's next submission, which runs this recording.
        let norm_init = n_items.map_or(1.0, |x| x as f32);
        let norm = ws.storage(d, slot::NORM, "xent norm", 16);
        self.queue.write_buffer(&norm, 0, bytemuck::cast_slice(&[norm_init, 1.0, 0.0, 0.0]));
        // The class weights (a dummy without them).
        let class_weights = ws.storage(d, slot::CLASS_WEIGHTS, "xent class weights", v as u64 * 4);
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(&class_weights, 0, bytemuck::cast_slice(w));
        }
        let counted = ws.storage(d, slot::COUNTED, "xent counted rows", if z_split { rows * 4 } else { 16 });
        let z_parts = ws.storage(d, slot::Z_PARTS, "xent z-loss parts", if z_split { rows * 8 } else { 16 });
        // Scratch of the tree sums: the row weights' levels (Σ w_y), with z_split the
        // counted rows' (their number) and their ratio, then the losses' levels, which
        // divide by the denominators for `mean`.
        let count_levels = reduce_levels(rows, 0, wg, max_dim, 1.0, NO_INDEX);
        let counted_levels = reduce_levels(rows, count_levels.extent, wg, max_dim, 1.0, NO_INDEX);
        let ratio_levels = reduce_levels(1, counted_levels.extent, wg, max_dim, 1.0, counted_levels.result);
        let loss_src = if z_split { ratio_levels.extent } else { count_levels.extent };
        let (divisor, divisor_index) = match (reduction, n_items) {
            (Reduction::Mean, Some(x)) => (x as f32, NO_INDEX),
            (Reduction::Mean, None) => (1.0, count_levels.result),
            _ => (1.0, NO_INDEX),
        };
        let loss_levels = reduce_levels(rows, loss_src, wg, max_dim, divisor, divisor_index);
        let z_levels = reduce_levels(rows, loss_levels.extent, wg, max_dim, 1.0, counted_levels.result);
        let pair_levels = reduce_levels(2, z_levels.extent, wg, max_dim, 1.0, NO_INDEX);
        let extent = if z_split { pair_levels.extent } else { loss_levels.extent };
        let scratch = ws.storage(d, slot::SCRATCH, "xent scratch", extent * 4);

        let levels = count_levels.levels.len()
            + counted_levels.levels.len()
            + 2 * loss_levels.levels.len()
            + pair_levels.levels.len();
        let metric_levels = metric_bufs.as_ref().map_or(0, |m| m.2.levels.len());
        let blocks_needed = (4 * chunks + 8 + levels + metric_levels) as u64;
        let params = ws.uniform(d, slot::PARAMS, "xent params", blocks_needed * params_stride(&self.limits));

        let mut rec = Recorder::into_encoder(encoder, &self.limits);
        // 1. Row weights from the targets, and their sum (the `mean` denominator), before
        //    the kernels: a `mean` gradient is then scaled in the pass that makes it.
        let targets_range = (&targets, targets_offset, rows * 4);
        let record_weights = |rec: &mut Recorder<'_>, out: &wgpu::Buffer, has_weights: u32| {
            let bg = bind_ranges(
                d,
                &self.kernels.weights,
                &params,
                &[targets_range, whole(out, rows * 4), whole(&class_weights, class_weights.size())],
            );
            let groups = rows.div_ceil(u64::from(wg));
            let p = WeightParams {
                rows: n as u32,
                groups_x: groups_x(groups, max_dim),
                classes: v as u32,
                ignore_index,
                has_weights,
                _pad: [0; 3],
            };
            rec.dispatch(&self.kernels.weights, &bg, &p, groups);
        };
        record_weights(&mut rec, &weight, kopts.has_weights);
        let reduce_bg = bind_ranges(d, &self.kernels.reduce, &params, &[whole(&scratch, scratch.size())]);
        rec.copy(&weight, 0, &scratch, 0, rows * 4);
        count_levels.record(&mut rec, &self.kernels, &reduce_bg);
        if reduction == Reduction::Mean && n_items.is_none() {
            rec.copy(&scratch, u64::from(count_levels.result) * 4, &norm, 0, 4);
        }
        if z_split {
            // The counted rows (weights of 1), and Σ w_y / their number into norm[1].
            record_weights(&mut rec, &counted, 0);
            rec.copy(&counted, 0, &scratch, count_levels.extent * 4, rows * 4);
            counted_levels.record(&mut rec, &self.kernels, &reduce_bg);
            // Through `loss` (its element 2): a buffer cannot be copied into itself.
            let at = counted_levels.extent * 4;
            rec.copy(&scratch, u64::from(count_levels.result) * 4, &loss, 8, 4);
            rec.copy(&loss, 8, &scratch, at, 4);
            ratio_levels.record(&mut rec, &self.kernels, &reduce_bg);
            rec.copy(&scratch, u64::from(ratio_levels.result) * 4, &norm, 4, 4);
        }

        // 2. The gradient's destination, chunk by chunk.
        let format = match f.half {
            Some(format) if direct_half => ElemFormat::Half {
                format,
                half_grad: matches!(f.gradient, DeviceGradient::IntoHalf(_)),
                native: self.native_f16() && format == HalfFormat::F16,
            },
            _ => ElemFormat::f32_for(v),
        };
        let esize = if direct_half { 2 } else { 4 };
        let (grad_mode, after) = match f.gradient {
            DeviceGradient::None => (GradMode::None, After::Nothing),
            DeviceGradient::Into(_) => (GradMode::Separate, After::Nothing),
            DeviceGradient::IntoHalf(_) if direct_half => (GradMode::Separate, After::Nothing),
            // Over the widened f32 chunk, then rounded into the caller's half buffer.
            DeviceGradient::IntoHalf(grad) => (GradMode::InPlace, After::Narrow(grad)),
            DeviceGradient::InPlace if widened => (GradMode::InPlace, After::Narrow(f.logits)),
            DeviceGradient::InPlace => (GradMode::InPlace, After::Nothing),
        };
        let grad_range = |e0: u64, len: u64| match f.gradient {
            DeviceGradient::Into(grad) => grad.elems(e0, len * 4),
            DeviceGradient::IntoHalf(grad) if direct_half => {
                (grad.buffer, grad.offset + e0 * 2, words(len * 2))
            }
            _ => (&dummy, 0, 16),
        };
        // `cross_entropy_backward.wgsl` over logits, into a gradient, times `upstream`
        // (per row, or a dummy).
        let backward_bind = |logits, grad, upstream| {
            bind_ranges(
                d,
                &self.kernels.backward,
                &params,
                &[
                    logits,
                    targets_range,
                    whole(&stats, rows * 8),
                    whole(&norm, 16),
                    grad,
                    whole(&class_weights, class_weights.size()),
                    upstream,
                ],
            )
        };
        if let Some((saved, _)) = backward {
            // (max, sum) = (lse, 1): the row statistics of the saved LSE.
            let bg = bind_ranges(
                d,
                &self.kernels.row_map,
                &params,
                &[
                    saved.range(rows * 4),
                    whole(&class_weights, 16),
                    whole(&class_weights, 16),
                    whole(&stats, rows * 8),
                ],
            );
            let groups = rows.div_ceil(u64::from(wg));
            let p = RowMapParams {
                rows: n as u32,
                groups_x: groups_x(groups, max_dim),
                mode: ROW_MAP_STATS,
                scale: 0.0,
            };
            rec.dispatch(&self.kernels.row_map, &bg, &p, groups);
        }

        // 3. The kernels over chunks of whole rows. Few long rows: a (row × column block)
        //    grid of workgroups fills the device where one workgroup per row would not.
        if grid {
            let bpr = v.div_ceil(SPLIT_BLOCK_COLS);
            let partials = ws.storage(d, slot::PARTIALS, "xent partials", (n * bpr * 48) as u64);
            let no_records = ws.storage(d, slot::NO_METRICS, "xent unused (metrics)", 32);
            let records = match &metric_bufs {
                Some((records, _, _)) => whole(records, rows * RECORD_BYTES),
                None => whole(&no_records, 32),
            };
            let logits_range = f.logits.range(total);
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
                    records,
                ],
            );
            // The gradient's scale is the divisor the device reduced into `norm`.
            let backward_bg =
                backward_bind(logits_range, grad_range(0, n as u64 * v as u64), whole(&norm, 16));
            let grid = RowGrid {
                rows: n,
                classes: v,
                ignore_index,
                grad_scale: 1.0,
                mode: grad_mode,
                metrics: metric_bufs.is_some(),
            };
            record_row_grid(
                &mut rec,
                &self.kernels,
                [&partials_bg, &merge_bg, &backward_bg],
                grid,
                &kopts,
                max_dim,
            );
        }
        for c in 0..chunks {
            let first = c * rows_per_chunk;
            let count = rows_per_chunk.min(n - first);
            let (e0, len) = ((first * v) as u64, (count * v) as u64);
            let logits_range = if direct_half {
                (f.logits.buffer, f.logits.offset + e0 * esize, words(len * esize))
            } else {
                self.chunk_logits(&mut rec, &params, f, &wide, widened, e0, len)
            };
            match backward {
                None => {
                    let mut ranges = vec![
                        logits_range,
                        targets_range,
                        whole(&row_loss, rows * 4),
                        whole(&lse, rows * 4),
                        grad_range(e0, len),
                        whole(&stats, rows * 8),
                        whole(&norm, 16),
                        whole(&class_weights, class_weights.size()),
                    ];
                    let (kernel, features) = match (&metric_bufs, &self.kernels.rows_metrics) {
                        (Some((records, _, _)), Some(kernel)) => {
                            ranges.push(whole(records, rows * RECORD_BYTES));
                            (kernel, kopts.features() | F_METRICS)
                        }
                        _ => (&self.kernels.rows, kopts.features()),
                    };
                    let bg = bind_ranges(d, kernel, &params, &ranges);
                    let groups = self.tuning.rows_workgroups((count as u64).div_ceil(rows_per_group));
                    let p = RowParams {
                        rows: count as u32,
                        classes: v as u32,
                        row_base: first as u32,
                        groups_x: groups_x(groups, max_dim),
                        grad_scale: 1.0,
                        grad_mode: grad_mode as u32,
                        ignore_index,
                        threads_per_row,
                        cached: u32::from(cached),
                        ..bytemuck::Zeroable::zeroed()
                    }
                    .with_opts(&kopts);
                    let pipeline = self.kernels.rows_variants.get(d, format, features);
                    rec.dispatch_pipeline(&pipeline, &bg, &p, groups);
                }
                Some((_, upstream)) => {
                    let (scale, per_row, up) = match upstream {
                        DeviceUpstream::Scalar(g) => (g, 0, whole(&norm, 16)),
                        DeviceUpstream::PerRow(up) => (1.0, 1, up.range(rows * 4)),
                        DeviceUpstream::PerElement(_) => unreachable!("checked: per-row or scalar"),
                    };
                    let bg = backward_bind(logits_range, grad_range(e0, len), up);
                    let grid = RowGrid {
                        rows: count,
                        classes: v,
                        ignore_index,
                        grad_scale: scale,
                        mode: grad_mode,
                        metrics: false,
                    };
                    let p = grid.backward_params(first, per_row, &kopts, max_dim);
                    rec.dispatch(&self.kernels.backward, &bg, &p, grid.workgroups());
                }
            }
            self.finish_gradient(&mut rec, &params, f, after, &wide, e0, len);
        }

        // 4. The loss, reduced on the device (`mean` divides by the count in its last
        //    level; with z_split each part by its own denominator, then the two added).
        if backward.is_none() {
            if z_split {
                let bg = bind_ranges(
                    d,
                    &self.kernels.row_map,
                    &params,
                    &[
                        whole(&lse, rows * 4),
                        whole(&row_loss, rows * 4),
                        whole(&counted, rows * 4),
                        whole(&z_parts, rows * 8),
                    ],
                );
                let groups = rows.div_ceil(u64::from(wg));
                let p = RowMapParams {
                    rows: n as u32,
                    groups_x: groups_x(groups, max_dim),
                    mode: ROW_MAP_Z_SPLIT,
                    scale: opts.get_z_loss() as f32,
                };
                rec.dispatch(&self.kernels.row_map, &bg, &p, groups);
                rec.copy(&z_parts, 0, &scratch, loss_src * 4, rows * 4);
                rec.copy(&z_parts, rows * 4, &scratch, loss_levels.extent * 4, rows * 4);
                loss_levels.record(&mut rec, &self.kernels, &reduce_bg);
                z_levels.record(&mut rec, &self.kernels, &reduce_bg);
                // The two parts side by side, through `loss`.
                rec.copy(&scratch, u64::from(loss_levels.result) * 4, &loss, 0, 4);
                rec.copy(&scratch, u64::from(z_levels.result) * 4, &loss, 4, 4);
                rec.copy(&loss, 0, &scratch, z_levels.extent * 4, 8);
                pair_levels.record(&mut rec, &self.kernels, &reduce_bg);
                rec.copy(&scratch, u64::from(pair_levels.result) * 4, &loss, 0, 4);
            } else {
                rec.copy(&row_loss, 0, &scratch, loss_src * 4, rows * 4);
                loss_levels.record(&mut rec, &self.kernels, &reduce_bg);
                rec.copy(&scratch, u64::from(loss_levels.result) * 4, &loss, 0, 4);
            }
            rec.copy(&scratch, u64::from(count_levels.result) * 4, &loss, 4, 4);
        }
        if let (Some(m), Some(spec)) = (&metric_bufs, metrics) {
            self.record_metric_sums(&mut rec, &params, n, spec, m);
        }
        debug_assert!(
            rec.blocks() <= blocks_needed,
            "{} parameter blocks, room for {blocks_needed}",
            rec.blocks()
        );
        rec.write_params(&self.queue, &params);
        Ok(DeviceLoss {
            row_loss,
            lse,
            loss,
            rows: n,
            metrics: metrics.zip(metric_bufs).map(|(spec, (records, sums, _))| DeviceMetrics {
                spec: spec.clone(),
                sums: Some(sums),
                records: Some(records),
            }),
            _scratch: vec![
                weight,
                stats,
                scratch,
                params,
                dummy,
                norm,
                class_weights,
                counted,
                z_parts,
                wide,
                targets,
            ],
        })
    }

    /// Probability targets: `cross_entropy_soft.wgsl` over chunks of whole rows, fused or
    /// from a saved LSE.
    fn record_soft(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        f: &Frame<'_>,
        probs: DeviceSlice<'_>,
        mode: DeviceMode<'_>,
        opts: &LossOptions,
        ws: &mut DeviceWorkspace,
    ) -> Result<DeviceLoss> {
        let (n, v) = (f.n, f.v);
        let (wg, max_dim) = (f.wg, f.max_dim);
        let reduction = opts.get_reduction();
        let denom = if reduction == Reduction::Mean { opts.mean_denominator(n as f64) } else { 1.0 };
        let kopts = KernelOpts::new(opts, v);
        let (saved, upstream) = match mode {
            DeviceMode::Fused => (None, DeviceUpstream::Scalar(1.0)),
            DeviceMode::Backward { lse, upstream } => (lse, upstream),
        };
        let host_upstream = match upstream {
            DeviceUpstream::Scalar(g) => Upstream::Scalar(g),
            _ => Upstream::PerRow(&[]),
        };
        let has_grad = !matches!(f.gradient, DeviceGradient::None);
        let (mut flags, scale) = soft_flags(has_grad, saved.is_some(), host_upstream, denom);
        let metrics = opts.get_metrics().filter(|_| saved.is_none());
        let metric_bufs = metrics.map(|spec| self.device_metric_buffers(spec, f, ws)).transpose()?;
        if metric_bufs.is_some() {
            flags |= SOFT_METRICS;
        }
        let widened = f.half.is_some();
        let row_bytes = v as u64 * 4;
        let rows_per_chunk = f.rows_per_chunk(row_bytes, f.max_groups())?;
        let chunks = n.div_ceil(rows_per_chunk);
        let chunk_bytes = rows_per_chunk.min(n) as u64 * row_bytes;

        let d = &self.device;
        let rows = n as u64;
        let row_loss = ws.storage(d, slot::ROW_LOSS, "xent row_loss", rows * 4);
        let lse = ws.storage(d, slot::LSE, "xent lse", rows * 4);
        let loss = ws.storage(d, slot::LOSS, "xent loss", 16);
        self.queue.write_buffer(&loss, 0, bytemuck::cast_slice(&[0.0f32, n as f32]));
        let dummy = ws.storage(d, slot::DUMMY, "xent unused", 16);
        let dummy_ro = ws.storage(d, slot::DUMMY_RO, "xent unused (read)", 16);
        let metrics_dummy = ws.storage(d, slot::NO_METRICS, "xent unused (metrics)", 32);
        let weights = ws.storage(d, slot::CLASS_WEIGHTS, "xent class weights", v as u64 * 4);
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(&weights, 0, bytemuck::cast_slice(w));
        }
        let [wide, grad] = ws.chunk_scratch(d, f, chunk_bytes);
        let levels = reduce_levels(rows, 0, wg, max_dim, denom as f32, NO_INDEX);
        let scratch = ws.storage(d, slot::SCRATCH, "xent scratch", levels.extent * 4);
        let metric_levels = metric_bufs.as_ref().map_or(0, |m| m.2.levels.len());
        let blocks_needed = (3 * chunks + levels.levels.len() + metric_levels) as u64;
        let params = ws.uniform(d, slot::PARAMS, "xent params", blocks_needed * params_stride(&self.limits));
        let after = f.after_scratch();
        let lse_range = match saved {
            Some(saved) => saved.range(rows * 4),
            None => whole(&lse, rows * 4),
        };
        let upstream_range = match upstream {
            DeviceUpstream::PerRow(up) => up.range(rows * 4),
            _ => whole(&dummy_ro, 16),
        };
        let mut rec = Recorder::into_encoder(encoder, &self.limits);
        for c in 0..chunks {
            let first = c * rows_per_chunk;
            let count = rows_per_chunk.min(n - first);
            let (e0, len) = ((first * v) as u64, (count * v) as u64);
            let logits_range = self.chunk_logits(&mut rec, &params, f, &wide, widened, e0, len);
            let grad_range = f.scratch_grad_range(&dummy, &grad, e0, len);
            let bg = bind_ranges(
                d,
                &self.kernels.soft,
                &params,
                &[
                    logits_range,
                    probs.elems(e0, len * 4),
                    whole(&row_loss, rows * 4),
                    lse_range,
                    grad_range,
                    whole(&weights, weights.size()),
                    upstream_range,
                    match &metric_bufs {
                        Some((records, _, _)) => whole(records, rows * RECORD_BYTES),
                        None => whole(&metrics_dummy, 32),
                    },
                ],
            );
            let p = soft_params(&kopts, count, v, first, flags, scale, max_dim);
            rec.dispatch(&self.kernels.soft, &bg, &p, count as u64);
            self.finish_gradient(&mut rec, &params, f, after, &grad, e0, len);
        }
        if saved.is_none() {
            let reduce_bg = bind_ranges(d, &self.kernels.reduce, &params, &[whole(&scratch, scratch.size())]);
            rec.copy(&row_loss, 0, &scratch, 0, rows * 4);
            levels.record(&mut rec, &self.kernels, &reduce_bg);
            rec.copy(&scratch, u64::from(levels.result) * 4, &loss, 0, 4);
        }
        if let (Some(m), Some(spec)) = (&metric_bufs, metrics) {
            self.record_metric_sums(&mut rec, &params, n, spec, m);
        }
        debug_assert!(rec.blocks() <= blocks_needed);
        rec.write_params(&self.queue, &params);
        Ok(DeviceLoss {
            row_loss,
            lse,
            loss,
            rows: n,
            metrics: metrics.zip(metric_bufs).map(|(spec, (records, sums, _))| DeviceMetrics {
                spec: spec.clone(),
                sums: Some(sums),
                records: Some(records),
            }),
            _scratch: vec![scratch, params, dummy, dummy_ro, weights, wide, grad, metrics_dummy],
        })
    }

    /// Binary targets: `binary_cross_entropy.wgsl` over chunks of elements, each chunk's
    /// workgroup sums tree-reduced, then the chunks' sums.
    fn record_binary(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        f: &Frame<'_>,
        targets: DeviceSlice<'_>,
        mode: DeviceMode<'_>,
        opts: &LossOptions,
        ws: &mut DeviceWorkspace,
    ) -> Result<DeviceLoss> {
        let (n, v) = (f.n, f.v);
        let (wg, max_dim) = (f.wg, f.max_dim);
        let elems = (n * v) as u64;
        let reduction = opts.get_reduction();
        let denom = if reduction == Reduction::Mean { opts.mean_denominator(elems as f64) } else { 1.0 };
        let backward = matches!(mode, DeviceMode::Backward { .. });
        let upstream = match mode {
            DeviceMode::Fused => DeviceUpstream::Scalar(1.0),
            DeviceMode::Backward { upstream, .. } => upstream,
        };
        let has_grad = !matches!(f.gradient, DeviceGradient::None);
        let losses = !backward && reduction == Reduction::None;
        let per_element = has_grad && matches!(upstream, DeviceUpstream::PerElement(_));
        let shape = BinaryShape::new(
            v,
            has_grad,
            losses,
            per_element,
            opts.get_weights().is_some(),
            opts.get_pos_weight().is_some(),
        );
        let scale = match upstream {
            DeviceUpstream::Scalar(g) => (1.0 / denom) as f32 * g,
            _ => (1.0 / denom) as f32,
        };
        // Chunks of elements at aligned offsets, within a binding and one dispatch.
        let quantum = (f.align / 4).max(1);
        let per_group = 4 * u64::from(wg);
        let chunk = ((f.bind_cap / 4).min(f.max_groups() * per_group) / quantum * quantum).max(quantum);
        let chunks = elems.div_ceil(chunk);
        let chunk_bytes = chunk.min(elems) * 4;
        let widened = f.half.is_some();

        let d = &self.device;
        let row_loss = ws.storage(d, slot::ROW_LOSS, "xent row_loss", if losses { elems * 4 } else { 16 });
        let lse = ws.storage(d, slot::LSE, "xent lse", 16);
        let loss = ws.storage(d, slot::LOSS, "xent loss", 16);
        self.queue.write_buffer(&loss, 0, bytemuck::cast_slice(&[0.0f32, elems as f32]));
        let dummy = ws.storage(d, slot::DUMMY, "xent unused", 16);
        let dummy_ro = ws.storage(d, slot::DUMMY_RO, "xent unused (read)", 16);
        let class_bytes = |on: bool| if on { v as u64 * 4 } else { 16 };
        let weights = ws.storage(
            d,
            slot::CLASS_WEIGHTS,
            "xent class weights",
            class_bytes(opts.get_weights().is_some()),
        );
        let pos_weight =
            ws.storage(d, slot::POS_WEIGHT, "xent pos_weight", class_bytes(opts.get_pos_weight().is_some()));
        if let Some(w) = opts.get_weights() {
            self.queue.write_buffer(&weights, 0, bytemuck::cast_slice(w));
        }
        if let Some(w) = opts.get_pos_weight() {
            self.queue.write_buffer(&pos_weight, 0, bytemuck::cast_slice(w));
        }
        let groups = chunk.min(elems).div_ceil(per_group);
        let partial_levels = reduce_levels(groups, 0, wg, max_dim, 1.0, NO_INDEX);
        let partials = ws.storage(d, slot::PARTIALS, "xent partials", partial_levels.extent * 4);
        let sum_levels = reduce_levels(chunks, 0, wg, max_dim, denom as f32, NO_INDEX);
        let sums = ws.storage(d, slot::SUMS, "xent sums", sum_levels.extent * 4);
        let [wide, grad] = ws.chunk_scratch(d, f, chunk_bytes);
        let blocks_needed =
            chunks * (3 + partial_levels.levels.len() as u64) + sum_levels.levels.len() as u64;
        let params = ws.uniform(d, slot::PARAMS, "xent params", blocks_needed * params_stride(&self.limits));
        let after = f.after_scratch();
        let partials_bg = bind_ranges(d, &self.kernels.reduce, &params, &[whole(&partials, partials.size())]);
        let mut rec = Recorder::into_encoder(encoder, &self.limits);
        for c in 0..chunks {
            let e0 = c * chunk;
            let len = chunk.min(elems - e0);
            let logits_range = self.chunk_logits(&mut rec, &params, f, &wide, widened, e0, len);
            let grad_range = f.scratch_grad_range(&dummy, &grad, e0, len);
            let losses_range = if losses { (&row_loss, e0 * 4, len * 4) } else { whole(&dummy, 16) };
            let upstream_range = match upstream {
                DeviceUpstream::PerElement(up) if per_element => up.elems(e0, len * 4),
                _ => whole(&dummy_ro, 16),
            };
            let bce_bg = bind_ranges(
                d,
                &self.kernels.binary,
                &params,
                &[
                    logits_range,
                    targets.elems(e0, len * 4),
                    whole(&weights, weights.size()),
                    whole(&pos_weight, pos_weight.size()),
                    grad_range,
                    losses_range,
                    whole(&partials, partials.size()),
                    upstream_range,
                ],
            );
            let piece = BinaryPiece {
                count: len as usize,
                col_start: (e0 % v as u64) as usize,
                flags: shape.flags(),
                scale,
            };
            let sum =
                record_binary_piece(&mut rec, &self.kernels, [&bce_bg, &partials_bg], piece, shape, max_dim);
            if let Some(sum) = sum.filter(|_| !backward) {
                rec.copy(&partials, u64::from(sum) * 4, &sums, c * 4, 4);
            }
            self.finish_gradient(&mut rec, &params, f, after, &grad, e0, len);
        }
        if !backward {
            let sums_bg = bind_ranges(d, &self.kernels.reduce, &params, &[whole(&sums, sums.size())]);
            sum_levels.record(&mut rec, &self.kernels, &sums_bg);
            rec.copy(&sums, u64::from(sum_levels.result) * 4, &loss, 0, 4);
        }
        debug_assert!(rec.blocks() <= blocks_needed);
        rec.write_params(&self.queue, &params);
        Ok(DeviceLoss {
            row_loss,
            lse,
            loss,
            rows: n,
            metrics: None,
            _scratch: vec![dummy, dummy_ro, weights, pos_weight, partials, sums, wide, grad, params],
        })
    }

    /// Reads the evaluation metrics of a recorded evaluation back to the host (after the
    /// caller has submitted the encoder): the sums the device reduced, and each row's
    /// prediction and confidence when the spec asked for them per row. `None` when the
    /// options asked for no metrics.
    pub fn read_device_metrics(&self, out: &DeviceLoss) -> Result<Option<crate::Metrics>> {
        let Some(m) = &out.metrics else { return Ok(None) };
        let (Some(sums), Some(records)) = (&m.sums, &m.records) else {
            return Ok(Some(crate::Metrics::from_rows(&m.spec, &[])));
        };
        let words: Vec<u32> =
            self.read_device_buffer(sums, entry_words(&m.spec))?.iter().map(|x| x.to_bits()).collect();
        let sums = super::metrics::sums_of_entry(&m.spec, &words);
        let rows = m.spec.get_per_row().then(|| -> Result<Vec<crate::RowMetrics>> {
            let words: Vec<u32> =
                self.read_device_buffer(records, out.rows * 8)?.iter().map(|x| x.to_bits()).collect();
            let mut rows = vec![crate::RowMetrics::UNSET; out.rows];
            super::metrics::decode(&words, &mut rows);
            Ok(rows)
        });
        Ok(Some(crate::Metrics::from_sums(&sums, rows.transpose()?.as_deref())))
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
