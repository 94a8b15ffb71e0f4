//! The WGSL kernels, their parameter blocks and their bind group layouts, declared once
//! next to each other so that a shader and the layout that serves it cannot drift apart:
//! [`shaders`] lists every module the host can build with the parameter block and the
//! constants it shares with the host, and tests/shaders.rs checks each against the
//! shader through naga. The sources come from the WGSL library ([`super::wgsl`]).

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::{Mutex, OnceLock};

use bytemuck::{Pod, Zeroable};

use super::tuning::GemmTuning;
use super::wgsl;

/// The bench's copy roofline (1 read + 1 write).
pub const BENCH_COPY_WGSL: &str = wgsl::file("bench_copy");
/// The bench's read roofline (1 read).
pub const BENCH_READ_WGSL: &str = wgsl::file("bench_read");

/// How the fused kernel reads the logits and writes the gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ElemFormat {
    /// f32, one per load (V not a multiple of 4).
    F32,
    /// f32, four per load.
    Vec4,
    /// Half precision, two per u32 (V even); the gradient in f32, or in the input's type.
    /// `native`: f16 read as WGSL `f16` (the adapter has `SHADER_F16`); otherwise the
    /// portable `unpack2x16float`.
    Half { format: crate::HalfFormat, half_grad: bool, native: bool },
}

impl ElemFormat {
    /// How the variant reads and writes: "f32", "vec4", "native f16 → f16 gradient", ...
    pub fn describe(&self) -> String {
        match *self {
            ElemFormat::F32 => "f32".into(),
            ElemFormat::Vec4 => "vec4".into(),
            ElemFormat::Half { format, half_grad, native } => {
                let reader = match (format, native) {
                    (crate::HalfFormat::F16, true) => "native f16",
                    (crate::HalfFormat::F16, false) => "portable f16",
                    (crate::HalfFormat::Bf16, _) => "bf16",
                };
                let grad = if half_grad { "half gradient" } else { "f32 gradient" };
                format!("{reader}, {grad}")
            }
        }
    }

    /// The f32 format for rows of `classes` columns.
    pub fn f32_for(classes: usize) -> Self {
        if classes.is_multiple_of(4) { ElemFormat::Vec4 } else { ElemFormat::F32 }
    }

    /// Every format the host builds (`native` only with f16).
    pub fn all() -> Vec<Self> {
        use crate::HalfFormat::{Bf16, F16};
        let mut all = vec![ElemFormat::F32, ElemFormat::Vec4];
        for (format, native) in [(F16, false), (F16, true), (Bf16, false)] {
            for half_grad in [false, true] {
                all.push(ElemFormat::Half { format, half_grad, native });
            }
        }
        all
    }

    /// Columns per element: `WIDTH` of the shader.
    pub fn width(self) -> u32 {
        match self {
            ElemFormat::F32 => 1,
            ElemFormat::Vec4 => 4,
            ElemFormat::Half { .. } => 2,
        }
    }

    /// The library files that declare this element type.
    fn files(self) -> Vec<&'static str> {
        match self {
            ElemFormat::F32 => vec!["elem_f32"],
            ElemFormat::Vec4 => vec!["elem_vec4"],
            ElemFormat::Half { format, half_grad, native } => {
                let storage = match (format, native) {
                    (crate::HalfFormat::F16, true) => "elem_f16_native",
                    (crate::HalfFormat::F16, false) => "elem_f16",
                    (crate::HalfFormat::Bf16, _) => "elem_bf16",
                };
                vec![storage, if half_grad { "grad_half" } else { "grad_f32x2" }]
            }
        }
    }

    fn label(self) -> String {
        match self {
            ElemFormat::F32 => "f32".into(),
            ElemFormat::Vec4 => "vec4".into(),
            ElemFormat::Half { format, half_grad, native } => {
                let name = match format {
                    crate::HalfFormat::F16 => "f16",
                    crate::HalfFormat::Bf16 => "bf16",
                };
                let grad = if half_grad { name } else { "f32" };
                format!("{}{name}, {grad} gradient", if native { "native " } else { "" })
            }
        }
    }
}

/// The fused row kernel's source for an element format and a register cache of `cached`
/// floats per invocation (`CACHED_FLOATS` there), merging row states with subgroup
/// operations when `subgroups`.
pub(crate) fn rows_source(format: ElemFormat, cached: u32, subgroups: bool, metrics: bool) -> String {
    let mut files = format.files();
    files.push(if subgroups { "row_merge_subgroup" } else { "row_merge_workgroup" });
    files.push(if metrics { "row_metrics_store" } else { "row_metrics_off" });
    files.push("cross_entropy_rows");
    wgsl::with_u32_const(&wgsl::compose(&files), "CACHED_FLOATS", cached)
}

/// Floats each invocation of `cross_entropy_rows.wgsl` keeps in registers on its one-read
/// path by default (`CACHED_FLOATS` there; the host builds it with the tuning's value).
pub(crate) const ROWS_CACHED: u32 = super::tuning::Tuning::GPU.cached_per_thread;

/// `FEATURES` bits of `cross_entropy_rows.wgsl` (`F_*` there): class weights.
pub(crate) const F_WEIGHTS: u32 = 1;
/// Label smoothing.
pub(crate) const F_SMOOTHING: u32 = 2;
/// z-loss.
pub(crate) const F_Z_LOSS: u32 = 4;
/// Logit softcap.
pub(crate) const F_SOFTCAP: u32 = 8;
/// Logit scale.
pub(crate) const F_SCALE: u32 = 16;
/// The evaluation metrics (`row_metrics.wgsl`), over the layout with binding 9
/// ([`Kernels::rows_metrics`]).
pub(crate) const F_METRICS: u32 = 32;

/// Top-k values the device's metric reduction takes (`MAX_K` of reduce_metrics.wgsl).
pub(crate) const METRICS_MAX_K: usize = 8;
/// Words of a metric entry's head (`HEAD`).
pub(crate) const METRICS_HEAD: usize = 16;
/// Calibration bins one invocation sums (`BIN_GROUP`).
pub(crate) const METRICS_BIN_GROUP: usize = 16;
/// Entries one invocation adds (`IN`).
pub(crate) const METRICS_IN: usize = 64;
/// Rows one invocation adds (`IN_ROWS`).
pub(crate) const METRICS_IN_ROWS: usize = 1024;

/// `SoftParams::flags` bits (`FLAG_*` of `cross_entropy_soft.wgsl`): write the gradient.
pub(crate) const SOFT_GRAD: u32 = 1;
/// Take the row's saved LSE (a separate backward).
pub(crate) const SOFT_SAVED_LSE: u32 = 2;
/// Multiply row r's gradient by `upstream[r]`.
pub(crate) const SOFT_PER_ROW: u32 = 4;
/// Write each row's metrics (binding 8).
pub(crate) const SOFT_METRICS: u32 = 8;

/// `BinaryParams::flags` bits (`FLAG_*` of `binary_cross_entropy.wgsl`): write the
/// gradient.
pub(crate) const BINARY_GRAD: u32 = 1;
/// Write the element losses.
pub(crate) const BINARY_LOSSES: u32 = 2;
/// Multiply each gradient by `upstream[i]`.
pub(crate) const BINARY_UPSTREAM: u32 = 4;

/// `ConvertParams::flags` modes (`MODE_*` of `convert_half.wgsl`): half → f32.
pub(crate) const CONVERT_WIDEN: u32 = 0;
/// f32 → half, rounded once, keeping the other half of a word at either end.
pub(crate) const CONVERT_NARROW: u32 = 1;
/// f32 bits copied over 32-bit words.
pub(crate) const CONVERT_COPY: u32 = 2;
/// The 16-bit values are bf16 (`FLAG_BF16`).
pub(crate) const CONVERT_BF16: u32 = 4;

/// `RowMapParams::mode` values (`MODE_*` of `row_map.wgsl`): (lse, 1) statistics of a
/// saved LSE.
pub(crate) const ROW_MAP_STATS: u32 = 0;
/// The cross-entropy and z-loss parts of each row loss.
pub(crate) const ROW_MAP_Z_SPLIT: u32 = 1;

/// Gradient modes of the kernels (`GRAD_*` of grad_mode.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum GradMode {
    None = 0,
    Separate = 1,
    InPlace = 2,
}

/// `Params` of `cross_entropy_rows.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct RowParams {
    pub rows: u32,
    pub classes: u32,
    pub row_base: u32,
    pub groups_x: u32,
    pub grad_scale: f32,
    pub grad_mode: u32,
    pub ignore_index: i32,
    pub threads_per_row: u32,
    pub cached: u32,
    pub logit_scale: f32,
    pub softcap: f32,
    pub smoothing: f32,
    pub z_loss: f32,
    pub weight_total: f32,
    pub z_grad: f32,
    pub _pad: u32,
}

impl RowParams {
    /// With the options of `k` (class weights come through `KernelOpts::features`).
    pub fn with_opts(self, k: &KernelOpts) -> Self {
        Self {
            logit_scale: k.logit_scale,
            softcap: k.softcap,
            smoothing: k.smoothing,
            z_loss: k.z_loss,
            weight_total: k.weight_total,
            z_grad: k.z_grad,
            ..self
        }
    }
}

/// The loss options as the kernels take them (see `LossOpts` in row_state.wgsl).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct KernelOpts {
    pub has_weights: u32,
    pub logit_scale: f32,
    pub softcap: f32,
    pub smoothing: f32,
    pub z_loss: f32,
    pub weight_total: f32,
    /// The z-loss scale of the gradient: `z_loss` unless the z-loss part divides by
    /// another denominator than the cross-entropy part (see
    /// [`crate::Batch::z_gradient_loss_scale`]).
    pub z_grad: f32,
}

impl KernelOpts {
    /// The `FEATURES` bits of `cross_entropy_rows.wgsl` these options need.
    pub fn features(&self) -> u32 {
        let mut f = 0;
        if self.has_weights != 0 {
            f |= F_WEIGHTS;
        }
        if self.smoothing != 0.0 {
            f |= F_SMOOTHING;
        }
        if self.z_loss != 0.0 {
            f |= F_Z_LOSS;
        }
        if self.softcap != 0.0 {
            f |= F_SOFTCAP;
        }
        if self.logit_scale != 1.0 {
            f |= F_SCALE;
        }
        f
    }

    pub fn new(opts: &crate::LossOptions, classes: usize) -> Self {
        let weights = opts.get_weights();
        Self {
            has_weights: u32::from(weights.is_some()),
            logit_scale: opts.get_logit_scale() as f32,
            softcap: opts.get_softcap().unwrap_or(0.0) as f32,
            smoothing: opts.get_label_smoothing() as f32,
            z_loss: opts.get_z_loss() as f32,
            weight_total: weights.map_or(classes as f64, |w| w.iter().map(|&x| f64::from(x)).sum()) as f32,
            z_grad: opts.get_z_loss() as f32,
        }
    }

    /// With the gradient's z-loss scale of `batch` under `reduction`.
    pub fn for_batch(self, batch: &crate::Batch, opts: &crate::LossOptions) -> Self {
        let z = batch.z_gradient_loss_scale(opts.get_z_loss(), opts.get_reduction());
        Self { z_grad: z as f32, ..self }
    }
}

/// `Params` of `row_partials.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct PartialParams {
    pub rows: u32,
    pub row_stride: u32,
    pub cols: u32,
    pub col_base: u32,
    pub block_cols: u32,
    pub blocks: u32,
    pub row_base: u32,
    pub groups_x: u32,
    pub out_base: u32,
    pub out_stride: u32,
    pub ignore_index: i32,
    pub classes: u32,
    pub has_weights: u32,
    pub logit_scale: f32,
    pub softcap: f32,
    pub smoothing: f32,
    /// 1: the metrics' parts too.
    pub metrics: u32,
    /// The entry (within a row) holding the target's z when it is not bound
    /// ([`NO_ENTRY`]: bound, or no metrics).
    pub zt_entry: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// `PartialParams::zt_entry` when the target's column is bound (`NO_ARG` of the shaders).
pub(crate) const NO_ENTRY: u32 = u32::MAX;

impl PartialParams {
    /// With the options of `k` (the plain loss when all are off).
    pub fn with_opts(self, k: &KernelOpts) -> Self {
        Self {
            has_weights: k.has_weights,
            logit_scale: k.logit_scale,
            softcap: k.softcap,
            smoothing: k.smoothing,
            ..self
        }
    }
}

/// `Params` of `merge_partials.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct MergeParams {
    pub rows: u32,
    pub blocks: u32,
    pub row_base: u32,
    pub groups_x: u32,
    pub classes: u32,
    pub ignore_index: i32,
    pub has_weights: u32,
    pub smoothing: f32,
    pub z_loss: f32,
    pub weight_total: f32,
    /// 1: write each row's metric record.
    pub metrics: u32,
    pub _pad: u32,
}

impl MergeParams {
    /// With the options of `k`.
    pub fn with_opts(self, k: &KernelOpts) -> Self {
        Self {
            has_weights: k.has_weights,
            smoothing: k.smoothing,
            z_loss: k.z_loss,
            weight_total: k.weight_total,
            ..self
        }
    }
}

/// `Params` of `cross_entropy_backward.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BackwardParams {
    pub rows: u32,
    pub row_stride: u32,
    pub cols: u32,
    pub col_base: u32,
    pub block_cols: u32,
    pub blocks: u32,
    pub row_base: u32,
    pub groups_x: u32,
    pub scale: f32,
    pub grad_mode: u32,
    pub ignore_index: i32,
    pub classes: u32,
    pub per_row: u32,
    pub has_weights: u32,
    pub logit_scale: f32,
    pub softcap: f32,
    pub smoothing: f32,
    pub z_loss: f32,
    pub weight_total: f32,
    pub z_grad: f32,
}

impl BackwardParams {
    /// With the options of `k`.
    pub fn with_opts(self, k: &KernelOpts) -> Self {
        Self {
            has_weights: k.has_weights,
            logit_scale: k.logit_scale,
            softcap: k.softcap,
            smoothing: k.smoothing,
            z_loss: k.z_loss,
            weight_total: k.weight_total,
            z_grad: k.z_grad,
            ..self
        }
    }
}

/// `Params` of `reduce_sum.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct ReduceParams {
    pub count: u32,
    pub src: u32,
    pub dst: u32,
    pub groups_x: u32,
    pub divisor: f32,
    pub last: u32,
    pub divisor_index: u32,
    pub _pad: u32,
}

/// `Params` of `reduce_metrics.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct MetricsReduceParams {
    pub count: u32,
    pub from_rows: u32,
    pub src: u32,
    pub dst: u32,
    pub bins: u32,
    pub k_count: u32,
    pub groups_x: u32,
    pub _pad: u32,
    pub k0: u32,
    pub k1: u32,
    pub k2: u32,
    pub k3: u32,
    pub k4: u32,
    pub k5: u32,
    pub k6: u32,
    pub k7: u32,
}

/// `Params` of `bench_copy.wgsl` and `bench_read.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BenchParams {
    pub count: u32,
    pub groups_x: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// `Params` of `row_weights.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct WeightParams {
    pub rows: u32,
    pub groups_x: u32,
    pub classes: u32,
    pub ignore_index: i32,
    pub has_weights: u32,
    pub _pad: [u32; 3],
}

/// `Params` of `narrow_targets.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct NarrowParams {
    pub rows: u32,
    pub groups_x: u32,
    pub ignore_lo: u32,
    pub ignore_hi: u32,
}

/// `Params` of `binary_cross_entropy.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct BinaryParams {
    pub count: u32,
    pub col_start: u32,
    pub classes: u32,
    pub groups_x: u32,
    pub scale: f32,
    pub has_weights: u32,
    pub has_pos_weight: u32,
    /// `BINARY_*` bits: gradient, element losses, upstream.
    pub flags: u32,
}

/// `Params` of `cross_entropy_soft.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct SoftParams {
    pub rows: u32,
    pub classes: u32,
    pub groups_x: u32,
    /// `SOFT_*` bits: gradient, saved LSE, per-row upstream.
    pub flags: u32,
    pub has_weights: u32,
    pub grad_scale: f32,
    pub logit_scale: f32,
    pub softcap: f32,
    pub smoothing: f32,
    pub z_loss: f32,
    pub weight_total: f32,
    /// First row of the dispatch in `row_loss`, `row_lse` and `upstream` (the logits,
    /// targets and gradient bindings start at the dispatch's first row).
    pub row_base: u32,
}

/// `Params` of `convert_half.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct ConvertParams {
    pub first: u32,
    pub count: u32,
    pub groups_x: u32,
    /// `CONVERT_*`: a mode, and the bf16 bit.
    pub flags: u32,
}

/// `Params` of `row_map.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct RowMapParams {
    pub rows: u32,
    pub groups_x: u32,
    /// `ROW_MAP_*`.
    pub mode: u32,
    pub scale: f32,
}

/// `GemmParams::flags` bits (`FLAG_*` of `gemm.wgsl`): C += the product.
pub(crate) const GEMM_ACCUMULATE: u32 = 1;
/// + bias[bias_off + n].
pub(crate) const GEMM_BIAS: u32 = 2;
/// Floats of workgroup memory per operand of `gemm.wgsl` (`TILE_FLOATS` there).
pub(crate) const GEMM_TILE_FLOATS: u32 = 1024;

/// `GemmParams::loss_flags` bits (`LOSS_*` of `gemm_epilogue.wgsl`): class weights.
pub(crate) const LOSS_WEIGHTS: u32 = 1;
/// A per-row upstream gradient (`per_row[row]`, the `grad` epilogue).
pub(crate) const LOSS_PER_ROW: u32 = 2;
/// The evaluation metrics' parts against each row's target logit (`per_row[row]`, from
/// `head_target.wgsl`; the `partials` epilogue).
pub(crate) const LOSS_METRICS: u32 = 4;

/// `Params` of `gemm.wgsl` (the loss fields are read by `gemm_epilogue.wgsl` only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct GemmParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub a_off: u32,
    pub lda: u32,
    pub b_off: u32,
    pub ldb: u32,
    pub c_off: u32,
    pub ldc: u32,
    pub bias_off: u32,
    pub flags: u32,
    pub groups_x: u32,
    pub tiles_n: u32,
    pub tile_base: u32,
    pub col_base: u32,
    pub classes: u32,
    pub ignore_index: i32,
    pub loss_flags: u32,
    pub logit_scale: f32,
    pub softcap: f32,
    pub smoothing: f32,
    pub z_loss: f32,
    pub weight_total: f32,
    pub z_grad: f32,
    pub grad_scale: f32,
    pub out_base: u32,
    pub out_stride: u32,
    pub _pad0: u32,
}

impl GemmParams {
    /// With the loss options of `k` for the epilogues.
    pub fn with_opts(self, k: &KernelOpts) -> Self {
        Self {
            loss_flags: if k.has_weights != 0 { LOSS_WEIGHTS } else { 0 } | (self.loss_flags & LOSS_PER_ROW),
            logit_scale: k.logit_scale,
            softcap: k.softcap,
            smoothing: k.smoothing,
            z_loss: k.z_loss,
            weight_total: k.weight_total,
            z_grad: k.z_grad,
            ..self
        }
    }
}

/// `Params` of `linear_colsum.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct ColsumParams {
    pub rows: u32,
    pub cols: u32,
    pub groups_x: u32,
    pub accumulate: u32,
    pub col_base: u32,
    pub count: u32,
    /// Entry of `db` (bound at its piece) for column `col_base` of G.
    pub db_base: u32,
    /// First row of G this dispatch sums.
    pub row_base: u32,
}

/// `Params` of `head_target.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct HeadTargetParams {
    pub rows: u32,
    pub dim: u32,
    /// Class of the piece's first row of W.
    pub col_base: u32,
    /// Classes in the piece.
    pub count: u32,
    pub classes: u32,
    pub ignore_index: i32,
    pub has_bias: u32,
    pub groups_x: u32,
    pub logit_scale: f32,
    pub softcap: f32,
    /// 1: this dispatch writes the ignored rows' FLT_MAX.
    pub first_piece: u32,
    pub _pad0: u32,
}

/// The source of `gemm.wgsl` with its loader (vec4 loads, or one float per load), its
/// lanes (with the subgroup's broadcasts when `subgroups`) and the linear head's
/// epilogues (`gemm_epilogue.wgsl`, entry points beside `main`).
pub(crate) fn gemm_source(vec4: bool, subgroups: bool) -> String {
    wgsl::compose(&[
        if vec4 { "gemm_load_vec4" } else { "gemm_load_f32" },
        if subgroups { "gemm_lanes_subgroup" } else { "gemm_lanes_none" },
        "gemm",
        "gemm_epilogue",
    ])
}

/// Pipeline constants the host sets on `gemm.wgsl`.
pub(crate) const GEMM_OVERRIDES: [&str; 8] = ["GX", "GY", "BK", "A_T", "B_T", "SHARED", "TR", "WG"];

/// What a GEMM pipeline does with its tile of the product (its entry point).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum GemmEntry {
    /// `C (+)= A·B (+ bias)` (`main`).
    Store,
    /// The linear head's per-row softmax parts of the tile's logits (`partials`).
    Partials,
    /// The linear head's G from the rows' statistics (`grad`).
    Grad,
}

impl GemmEntry {
    fn name(self) -> &'static str {
        match self {
            GemmEntry::Store => "main",
            GemmEntry::Partials => "partials",
            GemmEntry::Grad => "grad",
        }
    }
}

/// A GEMM pipeline: vec4 loads, `A_T`, `B_T`, the tile, the entry point.
type GemmKey = (bool, bool, bool, GemmTuning, GemmEntry);

/// The linear head's matrix products: two bind group layouts (the plain product's, and
/// the epilogues' with the loss's arrays), a pipeline per (loader, operand layout, tile
/// shape, entry point), built on first use.
pub(crate) struct GemmKernels {
    /// The plain product's bind group layout (params; a, b, c, bias), for
    /// [`super::buffers::bind_ranges`].
    pub kernel: Kernel,
    /// The epilogues' (params; a, b, c, bias, targets, class weights, row statistics,
    /// upstream: eight storage bindings, WebGPU's default limit).
    pub epilogue: Kernel,
    /// The modules by (vec4 loads, subgroup lanes).
    modules: Mutex<HashMap<(bool, bool), wgpu::ShaderModule>>,
    built: Mutex<HashMap<GemmKey, RowsPipeline>>,
}

impl GemmKernels {
    fn new(device: &wgpu::Device) -> Self {
        let kernel = Kernel::layout_only::<GemmParams>(device, "gemm", &[(RO, 0), (RO, 0), (RW, 4), (RO, 4)]);
        let epilogue = Kernel::layout_only::<GemmParams>(
            device,
            "gemm epilogue",
            &[(RO, 0), (RO, 0), (RW, 4), (RO, 4), (RO, 4), (RO, 4), (RO, 8), (RO, 4)],
        );
        Self { kernel, epilogue, modules: Default::default(), built: Default::default() }
    }

    /// The pipeline with vec4 loads or not, `a_t` / `b_t` operand layouts, a tile of
    /// `[gx, gy, bk]` and the entry point (inside the caller's error scopes, as
    /// [`Kernel::pipeline`]).
    pub fn get(
        &self,
        device: &wgpu::Device,
        vec4: bool,
        a_t: bool,
        b_t: bool,
        tile: GemmTuning,
        entry: GemmEntry,
    ) -> RowsPipeline {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        built
            .entry((vec4, a_t, b_t, tile, entry))
            .or_insert_with(|| {
                let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
                // Only the broadcast tile needs the subgroup lanes: the other tiles keep
                // one module per loader whatever the device.
                let lanes = tile.broadcast;
                let module = modules.entry((vec4, lanes)).or_insert_with(|| {
                    device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some("gemm"),
                        source: wgpu::ShaderSource::Wgsl(gemm_source(vec4, lanes).into()),
                    })
                });
                let [gx, gy, bk, at, bt, shared, tr, wg] = GEMM_OVERRIDES;
                let layout = if entry == GemmEntry::Store { &self.kernel } else { &self.epilogue };
                let pipeline = pipeline_at(
                    device,
                    "gemm",
                    module,
                    &layout.layout,
                    entry.name(),
                    &[
                        (gx, f64::from(tile.x)),
                        (gy, f64::from(tile.y)),
                        (bk, f64::from(tile.k)),
                        (at, f64::from(u8::from(a_t))),
                        (bt, f64::from(u8::from(b_t))),
                        (shared, f64::from(u8::from(tile.shared))),
                        (tr, f64::from(tile.rows_per_invocation())),
                        (wg, f64::from(tile.x * tile.y)),
                    ],
                );
                let op = |t: bool| if t { "t" } else { "n" };
                let what = match entry {
                    GemmEntry::Store => String::new(),
                    other => format!(" {}", other.name()),
                };
                let name = format!(
                    "gemm ({}{}, {}, {}x{}x{}){what}",
                    op(a_t),
                    op(b_t),
                    if vec4 { "vec4" } else { "f32" },
                    tile.x,
                    tile.y,
                    if tile.broadcast {
                        "broadcast".into()
                    } else if tile.shared {
                        tile.k.to_string()
                    } else {
                        "direct".into()
                    }
                );
                RowsPipeline { pipeline, name }
            })
            .clone()
    }
}

/// `divisor_index` meaning "use the uniform divisor" (`NO_INDEX` of reduce_sum.wgsl).
pub(crate) const NO_INDEX: u32 = u32::MAX;

/// Size of the largest parameter block; each dispatch's block sits at a multiple of
/// the uniform offset alignment above it.
pub(crate) const MAX_PARAMS_SIZE: u64 = 112;

/// A field of a parameter block as the host lays it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamsField {
    /// The field's name (the shader's member of the same name).
    pub name: &'static str,
    /// Bytes from the start of the block.
    pub offset: usize,
    /// The WGSL type: `u32`, `i32`, `f32`, or `[u32; N]` for padding.
    pub ty: &'static str,
}

/// A `#[repr(C)]` parameter block of the host, for checking against the `Params` of its
/// shader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamsLayout {
    /// The Rust struct.
    pub rust: &'static str,
    /// `size_of` the struct.
    pub size: usize,
    /// Every field, in order.
    pub fields: Vec<ParamsField>,
}

trait WgslType {
    const TY: &'static str;
}
impl WgslType for u32 {
    const TY: &'static str = "u32";
}
impl WgslType for i32 {
    const TY: &'static str = "i32";
}
impl WgslType for f32 {
    const TY: &'static str = "f32";
}
impl<const N: usize> WgslType for [u32; N] {
    const TY: &'static str = "[u32; N]";
}

fn ty_of<S, T: WgslType>(_field: fn(&S) -> &T) -> &'static str {
    T::TY
}

/// The layout of a parameter block, naming every field (the destructuring fails to
/// compile when a field is added to the struct and not here).
macro_rules! params_layout {
    ($ty:ident { $($field:ident),* $(,)? }) => {{
        let _every_field = |p: $ty| {
            let $ty { $($field: _),* } = p;
        };
        ParamsLayout {
            rust: stringify!($ty),
            size: size_of::<$ty>(),
            fields: vec![$(ParamsField {
                name: stringify!($field),
                offset: std::mem::offset_of!($ty, $field),
                ty: ty_of::<$ty, _>(|p| &p.$field),
            }),*],
        }
    }};
}

impl RowParams {
    fn layout() -> ParamsLayout {
        params_layout!(RowParams {
            rows,
            classes,
            row_base,
            groups_x,
            grad_scale,
            grad_mode,
            ignore_index,
            threads_per_row,
            cached,
            logit_scale,
            softcap,
            smoothing,
            z_loss,
            weight_total,
            z_grad,
            _pad,
        })
    }
}

/// Every parameter block's layout with its kernel's name, for [`shaders`].
fn params_layouts() -> HashMap<&'static str, ParamsLayout> {
    HashMap::from([
        ("cross_entropy_rows", RowParams::layout()),
        (
            "row_partials",
            params_layout!(PartialParams {
                rows,
                row_stride,
                cols,
                col_base,
                block_cols,
                blocks,
                row_base,
                groups_x,
                out_base,
                out_stride,
                ignore_index,
                classes,
                has_weights,
                logit_scale,
                softcap,
                smoothing,
                metrics,
                zt_entry,
                _pad0,
                _pad1,
            }),
        ),
        (
            "merge_partials",
            params_layout!(MergeParams {
                rows,
                blocks,
                row_base,
                groups_x,
                classes,
                ignore_index,
                has_weights,
                smoothing,
                z_loss,
                weight_total,
                metrics,
                _pad,
            }),
        ),
        (
            "cross_entropy_backward",
            params_layout!(BackwardParams {
                rows,
                row_stride,
                cols,
                col_base,
                block_cols,
                blocks,
                row_base,
                groups_x,
                scale,
                grad_mode,
                ignore_index,
                classes,
                per_row,
                has_weights,
                logit_scale,
                softcap,
                smoothing,
                z_loss,
                weight_total,
                z_grad,
            }),
        ),
        (
            "reduce_sum",
            params_layout!(ReduceParams { count, src, dst, groups_x, divisor, last, divisor_index, _pad }),
        ),
        (
            "reduce_metrics",
            params_layout!(MetricsReduceParams {
                count,
                from_rows,
                src,
                dst,
                bins,
                k_count,
                groups_x,
                _pad,
                k0,
                k1,
                k2,
                k3,
                k4,
                k5,
                k6,
                k7
            }),
        ),
        (
            "row_weights",
            params_layout!(WeightParams { rows, groups_x, classes, ignore_index, has_weights, _pad }),
        ),
        ("narrow_targets", params_layout!(NarrowParams { rows, groups_x, ignore_lo, ignore_hi })),
        (
            "binary_cross_entropy",
            params_layout!(BinaryParams {
                count,
                col_start,
                classes,
                groups_x,
                scale,
                has_weights,
                has_pos_weight,
                flags,
            }),
        ),
        (
            "cross_entropy_soft",
            params_layout!(SoftParams {
                rows,
                classes,
                groups_x,
                flags,
                has_weights,
                grad_scale,
                logit_scale,
                softcap,
                smoothing,
                z_loss,
                weight_total,
                row_base,
            }),
        ),
        ("convert_half", params_layout!(ConvertParams { first, count, groups_x, flags })),
        ("row_map", params_layout!(RowMapParams { rows, groups_x, mode, scale })),
        (
            "gemm",
            params_layout!(GemmParams {
                m,
                n,
                k,
                a_off,
                lda,
                b_off,
                ldb,
                c_off,
                ldc,
                bias_off,
                flags,
                groups_x,
                tiles_n,
                tile_base,
                col_base,
                classes,
                ignore_index,
                loss_flags,
                logit_scale,
                softcap,
                smoothing,
                z_loss,
                weight_total,
                z_grad,
                grad_scale,
                out_base,
                out_stride,
                _pad0,
            }),
        ),
        (
            "linear_colsum",
            params_layout!(ColsumParams {
                rows,
                cols,
                groups_x,
                accumulate,
                col_base,
                count,
                db_base,
                row_base
            }),
        ),
        (
            "head_target",
            params_layout!(HeadTargetParams {
                rows,
                dim,
                col_base,
                count,
                classes,
                ignore_index,
                has_bias,
                groups_x,
                logit_scale,
                softcap,
                first_piece,
                _pad0
            }),
        ),
        ("bench_copy", params_layout!(BenchParams { count, groups_x, _pad0, _pad1 })),
        ("bench_read", params_layout!(BenchParams { count, groups_x, _pad0, _pad1 })),
    ])
}

/// Pipeline constants the host sets on the fused row kernel.
const ROWS_OVERRIDES: [&str; 3] = ["WG", "FEATURES", "ROW_LOOP"];
/// Pipeline constants the host sets on every other kernel.
const OVERRIDES: [&str; 1] = ["WG"];

/// One compute module the host can build, with what it shares with the host.
#[derive(Clone, Debug)]
pub struct Shader {
    /// The kernel (its file name without `.wgsl`) and, for the fused kernel, the variant.
    pub name: String,
    /// The complete source, imports resolved. One entry point, `main`.
    pub source: String,
    /// The host's block behind the uniform `params` (the shader's `Params`).
    pub params: ParamsLayout,
    /// Module-scope `const`s of the shader and the values the host takes them to have.
    pub constants: Vec<(&'static str, u32)>,
    /// Every pipeline-overridable constant the host sets.
    pub overrides: &'static [&'static str],
}

/// Every compute module the host can build: the fused kernel in every element format
/// with either row merge, and each other kernel. For validation and tooling.
pub fn shaders() -> Vec<Shader> {
    let layouts = params_layouts();
    let grad_modes = [
        ("GRAD_NONE", GradMode::None as u32),
        ("GRAD_SEPARATE", GradMode::Separate as u32),
        ("GRAD_IN_PLACE", GradMode::InPlace as u32),
    ];
    let mut out = Vec::new();
    for format in ElemFormat::all() {
        for (subgroups, metrics) in [(false, false), (true, false), (false, true), (true, true)] {
            let width = format.width();
            let mut constants = vec![
                ("F_WEIGHTS", F_WEIGHTS),
                ("F_SMOOTHING", F_SMOOTHING),
                ("F_Z_LOSS", F_Z_LOSS),
                ("F_SOFTCAP", F_SOFTCAP),
                ("F_SCALE", F_SCALE),
                ("F_METRICS", F_METRICS),
                ("WIDTH", width),
                ("CACHED_FLOATS", ROWS_CACHED),
                ("CACHED", (ROWS_CACHED / width).max(1)),
            ];
            constants.extend(grad_modes);
            let merge = if subgroups { "subgroups" } else { "workgroup merge" };
            let with = if metrics { ", metrics" } else { "" };
            out.push(Shader {
                name: format!("cross_entropy_rows ({}, {merge}{with})", format.label()),
                source: rows_source(format, ROWS_CACHED, subgroups, metrics),
                params: layouts["cross_entropy_rows"].clone(),
                constants,
                overrides: &ROWS_OVERRIDES,
            });
        }
    }
    let others: [(&str, Vec<(&'static str, u32)>); 14] = [
        ("row_partials", vec![]),
        ("merge_partials", vec![]),
        ("cross_entropy_backward", grad_modes.to_vec()),
        ("row_weights", vec![]),
        ("narrow_targets", vec![]),
        ("reduce_sum", vec![("NO_INDEX", NO_INDEX)]),
        (
            "reduce_metrics",
            vec![
                ("MAX_K", METRICS_MAX_K as u32),
                ("HEAD", METRICS_HEAD as u32),
                ("BIN_GROUP", METRICS_BIN_GROUP as u32),
                ("IN", METRICS_IN as u32),
                ("IN_ROWS", METRICS_IN_ROWS as u32),
            ],
        ),
        (
            "cross_entropy_soft",
            vec![
                ("FLAG_GRAD", SOFT_GRAD),
                ("FLAG_SAVED_LSE", SOFT_SAVED_LSE),
                ("FLAG_PER_ROW", SOFT_PER_ROW),
                ("FLAG_METRICS", SOFT_METRICS),
            ],
        ),
        (
            "binary_cross_entropy",
            vec![
                ("FLAG_GRAD", BINARY_GRAD),
                ("FLAG_LOSSES", BINARY_LOSSES),
                ("FLAG_UPSTREAM", BINARY_UPSTREAM),
            ],
        ),
        (
            "convert_half",
            vec![
                ("MODE_WIDEN", CONVERT_WIDEN),
                ("MODE_NARROW", CONVERT_NARROW),
                ("MODE_COPY", CONVERT_COPY),
                ("FLAG_BF16", CONVERT_BF16),
            ],
        ),
        ("row_map", vec![("MODE_STATS", ROW_MAP_STATS), ("MODE_Z_SPLIT", ROW_MAP_Z_SPLIT)]),
        ("head_target", vec![]),
        ("bench_copy", vec![]),
        ("bench_read", vec![]),
    ];
    for (name, constants) in others {
        out.push(Shader {
            name: name.into(),
            source: wgsl::compose(&[name]),
            params: layouts[name].clone(),
            constants,
            overrides: &OVERRIDES,
        });
    }
    for (vec4, subgroups) in [(false, false), (true, false), (false, true), (true, true)] {
        out.push(Shader {
            name: format!(
                "gemm ({}{})",
                if vec4 { "vec4 loads" } else { "f32 loads" },
                if subgroups { ", subgroup lanes" } else { "" }
            ),
            source: gemm_source(vec4, subgroups),
            params: layouts["gemm"].clone(),
            constants: vec![
                ("FLAG_ACCUMULATE", GEMM_ACCUMULATE),
                ("FLAG_BIAS", GEMM_BIAS),
                ("TILE_FLOATS", GEMM_TILE_FLOATS),
                ("LOSS_WEIGHTS", LOSS_WEIGHTS),
                ("LOSS_PER_ROW", LOSS_PER_ROW),
                ("LOSS_METRICS", LOSS_METRICS),
            ],
            overrides: &GEMM_OVERRIDES,
        });
    }
    out.push(Shader {
        name: "linear_colsum".into(),
        source: wgsl::compose(&["linear_colsum"]),
        params: layouts["linear_colsum"].clone(),
        constants: vec![],
        overrides: &OVERRIDES,
    });
    out
}

fn uniform_entry(size: usize) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding: 0,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Uniform,
            // One uniform buffer holds the parameters of every dispatch of a submission.
            has_dynamic_offset: true,
            min_binding_size: NonZeroU64::new(size as u64),
        },
        count: None,
    }
}

/// Storage bindings 1.. in order: `true` read-only, `false` read-write; `min` bytes.
fn storage_entries(kinds: &[(bool, u64)]) -> impl Iterator<Item = wgpu::BindGroupLayoutEntry> + '_ {
    kinds.iter().enumerate().map(|(i, &(read_only, min))| wgpu::BindGroupLayoutEntry {
        binding: i as u32 + 1,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: NonZeroU64::new(min),
        },
        count: None,
    })
}

/// How a kernel's pipeline is built when first dispatched.
struct Recipe {
    device: wgpu::Device,
    name: String,
    /// The complete module, imports resolved.
    source: String,
    wg: u32,
}

/// A bind group layout (built at once: bind groups need it) and the compute pipeline
/// that serves it, built on first use.
pub(crate) struct Kernel {
    pub layout: wgpu::BindGroupLayout,
    pub params_size: u64,
    /// `None` for a layout whose pipelines are built elsewhere ([`RowsVariants`]).
    recipe: Option<Recipe>,
    pipeline: OnceLock<wgpu::ComputePipeline>,
}

impl Kernel {
    /// The kernel of `source` (WGSL with `#import`s of the library) over a uniform `P` at
    /// binding 0 and `storage` at bindings 1.., in workgroups of `wg`.
    pub(crate) fn new<P: Pod>(
        device: &wgpu::Device,
        name: &str,
        source: &str,
        storage: &[(bool, u64)],
        wg: u32,
    ) -> Self {
        let recipe = Recipe {
            device: device.clone(),
            name: name.into(),
            source: wgsl::compose_text(name, source),
            wg,
        };
        Self { recipe: Some(recipe), ..Self::layout_only::<P>(device, name, storage) }
    }

    /// A bind group layout alone, for pipelines that variants build over it.
    pub(crate) fn layout_only<P: Pod>(device: &wgpu::Device, name: &str, storage: &[(bool, u64)]) -> Self {
        let entries: Vec<_> =
            std::iter::once(uniform_entry(size_of::<P>())).chain(storage_entries(storage)).collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(name),
            entries: &entries,
        });
        Self { layout, params_size: size_of::<P>() as u64, recipe: None, pipeline: OnceLock::new() }
    }

    /// The pipeline, built on the first call. Callers record dispatches inside
    /// `GpuContext::scoped`, whose error scopes catch a failed build as a typed error.
    ///
    /// # Panics
    /// For a [`Kernel::layout_only`].
    /// The kernel's name (its shader's), as [`super::trace`] reports its dispatches.
    pub(crate) fn name(&self) -> &str {
        self.recipe.as_ref().map_or("layout", |r| r.name.as_str())
    }

    pub(crate) fn pipeline(&self) -> &wgpu::ComputePipeline {
        self.pipeline.get_or_init(|| {
            let r = self.recipe.as_ref().expect("a layout-only kernel has no pipeline of its own");
            let module = r.device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&r.name),
                source: wgpu::ShaderSource::Wgsl(r.source.as_str().into()),
            });
            pipeline(&r.device, &r.name, &module, &self.layout, &[(OVERRIDES[0], f64::from(r.wg))])
        })
    }
}

fn pipeline(
    device: &wgpu::Device,
    name: &str,
    module: &wgpu::ShaderModule,
    layout: &wgpu::BindGroupLayout,
    constants: &[(&str, f64)],
) -> wgpu::ComputePipeline {
    pipeline_at(device, name, module, layout, "main", constants)
}

/// [`pipeline`] of the entry point `entry`.
fn pipeline_at(
    device: &wgpu::Device,
    name: &str,
    module: &wgpu::ShaderModule,
    layout: &wgpu::BindGroupLayout,
    entry: &str,
    constants: &[(&str, f64)],
) -> wgpu::ComputePipeline {
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(name),
        bind_group_layouts: &[Some(layout)],
        immediate_size: 0,
    });
    device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(name),
        layout: Some(&pipeline_layout),
        module,
        entry_point: Some(entry),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants,
            zero_initialize_workgroup_memory: false,
        },
        cache: None,
    })
}

/// The fused row kernel's pipelines for each option set in use (`FEATURES` bits), built
/// on first use over one shared bind group layout.
pub(crate) struct RowsVariants {
    layout: wgpu::BindGroupLayout,
    /// The layout with the metrics binding, where the adapter has one more storage buffer.
    metrics_layout: Option<wgpu::BindGroupLayout>,
    wg: u32,
    cached: u32,
    subgroups: bool,
    /// `ROW_LOOP`: workgroups take row groups in turn (`Tuning::max_workgroups` set).
    row_loop: bool,
    modules: Mutex<HashMap<(ElemFormat, bool), wgpu::ShaderModule>>,
    built: Mutex<HashMap<(ElemFormat, u32), RowsPipeline>>,
}

/// A pipeline of the fused kernel with the name that says which variant it is: element
/// format, row merge, option features (as [`super::trace`] reports it).
#[derive(Clone)]
pub(crate) struct RowsPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub name: String,
}

impl RowsVariants {
    /// The pipeline for rows in `format` computing the options in `features`, built on
    /// the first call (inside the caller's error scopes, as [`Kernel::pipeline`]). With
    /// [`F_METRICS`] it is over [`Kernels::rows_metrics`]'s layout, which must exist.
    pub fn get(&self, device: &wgpu::Device, format: ElemFormat, features: u32) -> RowsPipeline {
        let metrics = features & F_METRICS != 0;
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        built
            .entry((format, features))
            .or_insert_with(|| {
                let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
                let module = modules.entry((format, metrics)).or_insert_with(|| {
                    device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some("cross_entropy_rows"),
                        source: wgpu::ShaderSource::Wgsl(
                            rows_source(format, self.cached, self.subgroups, metrics).into(),
                        ),
                    })
                });
                let layout = match &self.metrics_layout {
                    Some(l) if metrics => l,
                    _ => &self.layout,
                };
                let [wg, feat, row_loop] = ROWS_OVERRIDES;
                let pipeline = pipeline(
                    device,
                    "cross_entropy_rows",
                    module,
                    layout,
                    &[
                        (wg, f64::from(self.wg)),
                        (feat, f64::from(features)),
                        (row_loop, f64::from(u8::from(self.row_loop))),
                    ],
                );
                let merge = if self.subgroups { "subgroup merge" } else { "workgroup merge" };
                let name =
                    format!("cross_entropy_rows ({}, {merge}, features {features:#x})", format.describe());
                RowsPipeline { pipeline, name }
            })
            .clone()
    }
}

pub(crate) const RO: bool = true;
pub(crate) const RW: bool = false;

/// Every kernel the context needs: the bind group layouts built with the context, each
/// pipeline on its first dispatch.
pub(crate) struct Kernels {
    /// The fused kernel's bind group layout (the pipelines are in `rows_variants`).
    pub rows: Kernel,
    /// The same with the per-row metrics at binding 9, where the adapter has nine storage
    /// buffers per stage (`None` elsewhere: metrics are then unsupported on the device).
    pub rows_metrics: Option<Kernel>,
    pub rows_variants: RowsVariants,
    pub partials: Kernel,
    pub merge: Kernel,
    pub backward: Kernel,
    pub reduce: Kernel,
    /// The metrics' sums (`reduce_metrics.wgsl`).
    pub reduce_metrics: Kernel,
    pub weights: Kernel,
    pub narrow: Kernel,
    pub binary: Kernel,
    pub soft: Kernel,
    pub convert: Kernel,
    pub row_map: Kernel,
    /// The linear head's matrix products (`gemm.wgsl`).
    pub gemm: GemmKernels,
    /// The linear head's bias gradient (`linear_colsum.wgsl`).
    pub colsum: Kernel,
    /// The linear head's target logits for its metrics (`head_target.wgsl`).
    pub head_target: Kernel,
    /// Workgroup size of every kernel (a power of two).
    pub workgroup_size: u32,
}

impl Kernels {
    pub fn new(device: &wgpu::Device, tuning: &super::tuning::Tuning) -> Self {
        let (wg, cached) = (tuning.workgroup_size, tuning.cached_per_thread);
        debug_assert!(wg.is_power_of_two());
        let subgroups = tuning.subgroups && device.features().contains(wgpu::Features::SUBGROUP);
        // logits (written in place), targets, row_loss, row_lse, grad, row_stats, norm,
        // weights.
        // Logits and grad have no minimum size: the scalar and vec4 variants share this
        // layout.
        const ROWS_STORAGE: [(bool, u64); 8] =
            [(RW, 0), (RO, 4), (RW, 4), (RW, 4), (RW, 0), (RW, 8), (RO, 8), (RO, 0)];
        let rows = Kernel::layout_only::<RowParams>(device, "cross_entropy_rows", &ROWS_STORAGE);
        // ... and row_metrics.
        let rows_metrics = (device.limits().max_storage_buffers_per_shader_stage > 8).then(|| {
            let mut storage = ROWS_STORAGE.to_vec();
            storage.push((RW, 32));
            Kernel::layout_only::<RowParams>(device, "cross_entropy_rows (metrics)", &storage)
        });
        let rows_variants = RowsVariants {
            layout: rows.layout.clone(),
            metrics_layout: rows_metrics.as_ref().map(|k| k.layout.clone()),
            wg,
            cached,
            subgroups,
            row_loop: tuning.max_workgroups != 0,
            modules: Default::default(),
            built: Default::default(),
        };
        Self {
            rows,
            rows_metrics,
            rows_variants,
            partials: Kernel::new::<PartialParams>(
                device,
                "row_partials",
                wgsl::file("row_partials"),
                // logits, targets, partials, weights
                &[(RO, 4), (RO, 4), (RW, 48), (RO, 4)],
                wg,
            ),
            merge: Kernel::new::<MergeParams>(
                device,
                "merge_partials",
                wgsl::file("merge_partials"),
                // partials, targets, row_loss, row_lse, row_weight, row_stats, weights,
                // row_metrics
                &[(RO, 48), (RO, 4), (RW, 4), (RW, 4), (RW, 4), (RW, 8), (RO, 4), (RW, 32)],
                wg,
            ),
            backward: Kernel::new::<BackwardParams>(
                device,
                "cross_entropy_backward",
                wgsl::file("cross_entropy_backward"),
                // logits (gradient in place), targets, row_stats, norm, grad, weights, upstream
                &[(RW, 4), (RO, 4), (RO, 8), (RO, 8), (RW, 4), (RO, 4), (RO, 4)],
                wg,
            ),
            // data
            reduce: Kernel::new::<ReduceParams>(
                device,
                "reduce_sum",
                wgsl::file("reduce_sum"),
                &[(RW, 4)],
                wg,
            ),
            // row records, entries
            reduce_metrics: Kernel::new::<MetricsReduceParams>(
                device,
                "reduce_metrics",
                wgsl::file("reduce_metrics"),
                &[(RO, 32), (RW, 4)],
                wg,
            ),
            // targets, row_weight, weights
            weights: Kernel::new::<WeightParams>(
                device,
                "row_weights",
                wgsl::file("row_weights"),
                &[(RO, 4), (RW, 4), (RO, 4)],
                wg,
            ),
            // i64 targets, i32 targets
            narrow: Kernel::new::<NarrowParams>(
                device,
                "narrow_targets",
                wgsl::file("narrow_targets"),
                &[(RO, 8), (RW, 4)],
                wg,
            ),
            // logits, targets, weights, pos_weight, grad, losses, partials, upstream
            binary: Kernel::new::<BinaryParams>(
                device,
                "binary_cross_entropy",
                wgsl::file("binary_cross_entropy"),
                &[(RO, 4), (RO, 4), (RO, 4), (RO, 4), (RW, 4), (RW, 4), (RW, 4), (RO, 4)],
                wg,
            ),
            // logits, probs, row_loss, row_lse (read for a saved LSE), grad, weights, upstream,
            // row_metrics
            soft: Kernel::new::<SoftParams>(
                device,
                "cross_entropy_soft",
                wgsl::file("cross_entropy_soft"),
                &[(RO, 4), (RO, 4), (RW, 4), (RW, 4), (RW, 4), (RO, 4), (RO, 4), (RW, 32)],
                wg,
            ),
            // 16-bit words, f32 values
            convert: Kernel::new::<ConvertParams>(
                device,
                "convert_half",
                wgsl::file("convert_half"),
                &[(RW, 4), (RW, 4)],
                wg,
            ),
            // a, b, c, out
            row_map: Kernel::new::<RowMapParams>(
                device,
                "row_map",
                wgsl::file("row_map"),
                &[(RO, 4), (RO, 4), (RO, 4), (RW, 4)],
                wg,
            ),
            gemm: GemmKernels::new(device),
            // G, db
            colsum: Kernel::new::<ColsumParams>(
                device,
                "linear_colsum",
                wgsl::file("linear_colsum"),
                &[(RO, 4), (RW, 4)],
                wg,
            ),
            // h, W, b, targets, target logits
            head_target: Kernel::new::<HeadTargetParams>(
                device,
                "head_target",
                wgsl::file("head_target"),
                &[(RO, 4), (RO, 4), (RO, 4), (RO, 4), (RW, 4)],
                wg,
            ),
            workgroup_size: wg,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused kernel's written `CACHED_FLOATS` is the host's default, so that the
    /// source as written is the one the host builds by default.
    #[test]
    fn written_cached_floats_is_rows_cached() {
        let source =
            wgsl::compose(&["elem_f32", "row_merge_workgroup", "row_metrics_off", "cross_entropy_rows"]);
        let module = naga::front::wgsl::parse_str(&source).expect("parses");
        let (_, c) =
            module.constants.iter().find(|(_, c)| c.name.as_deref() == Some("CACHED_FLOATS")).unwrap();
        let naga::Expression::Literal(naga::Literal::U32(v)) = module.global_expressions[c.init] else {
            panic!("CACHED_FLOATS is not a u32 literal")
        };
        assert_eq!(v, ROWS_CACHED);
    }

    #[test]
    fn max_params_size_is_the_largest_block() {
        let largest = params_layouts().values().map(|l| l.size).max().unwrap();
        assert_eq!(MAX_PARAMS_SIZE, largest as u64);
    }
}
