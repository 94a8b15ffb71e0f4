//! The WGSL kernels, their parameter blocks and their bind group layouts, declared once
//! next to each other so that a shader and the layout that serves it cannot drift apart.

use std::num::NonZeroU64;

use bytemuck::{Pod, Zeroable};

/// The online-softmax monoid, prepended to every row kernel.
pub const ROW_STATE_WGSL: &str = include_str!("../../shaders/row_state.wgsl");
/// Element type of the fused row kernel for V not a multiple of 4 (scalar loads).
pub const ELEM_F32_WGSL: &str = include_str!("../../shaders/elem_f32.wgsl");
/// Element type of the fused row kernel for V a multiple of 4 (vec4 loads).
pub const ELEM_VEC4_WGSL: &str = include_str!("../../shaders/elem_vec4.wgsl");
/// Element type of the fused row kernel for half-precision logits (vec2 over u32).
pub const ELEM_HALF_WGSL: &str = include_str!("../../shaders/elem_half.wgsl");
/// IEEE binary16 storage of the half element type.
pub const ELEM_F16_WGSL: &str = include_str!("../../shaders/elem_f16.wgsl");
/// IEEE binary16 storage as WGSL `f16`, for adapters with `SHADER_F16`.
pub const ELEM_F16_NATIVE_WGSL: &str = include_str!("../../shaders/elem_f16_native.wgsl");
/// bfloat16 storage of the half element type.
pub const ELEM_BF16_WGSL: &str = include_str!("../../shaders/elem_bf16.wgsl");
/// The fused row kernel's merge of a row's states through workgroup memory alone.
pub const ROW_MERGE_WORKGROUP_WGSL: &str = include_str!("../../shaders/row_merge_workgroup.wgsl");
/// The fused row kernel's merge with subgroup operations (devices with `SUBGROUP`).
pub const ROW_MERGE_SUBGROUP_WGSL: &str = include_str!("../../shaders/row_merge_subgroup.wgsl");

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
    /// The f32 format for rows of `classes` columns.
    pub fn f32_for(classes: usize) -> Self {
        if classes.is_multiple_of(4) { ElemFormat::Vec4 } else { ElemFormat::F32 }
    }
}
/// The fused row kernel: online softmax, row loss, LSE and the gradient.
pub const CROSS_ENTROPY_ROWS_WGSL: &str = include_str!("../../shaders/cross_entropy_rows.wgsl");
/// Partial (max, sum) states of column blocks, for rows split across dispatches.
pub const ROW_PARTIALS_WGSL: &str = include_str!("../../shaders/row_partials.wgsl");
/// Merges the block states of each row.
pub const MERGE_PARTIALS_WGSL: &str = include_str!("../../shaders/merge_partials.wgsl");
/// The gradient from saved row statistics, over a (row, column block) grid.
pub const CROSS_ENTROPY_BACKWARD_WGSL: &str = include_str!("../../shaders/cross_entropy_backward.wgsl");
/// Row weights (the `mean` denominator's terms) from targets alone.
pub const ROW_WEIGHTS_WGSL: &str = include_str!("../../shaders/row_weights.wgsl");
/// 64-bit class indices narrowed to i32 on the device (device-resident i64 targets).
pub const NARROW_TARGETS_WGSL: &str = include_str!("../../shaders/narrow_targets.wgsl");
/// One level of the deterministic tree sum used for `sum` and `mean`.
pub const REDUCE_SUM_WGSL: &str = include_str!("../../shaders/reduce_sum.wgsl");
/// Cross-entropy with probability (soft) targets.
pub const CROSS_ENTROPY_SOFT_WGSL: &str = include_str!("../../shaders/cross_entropy_soft.wgsl");
/// Binary cross-entropy with logits, elementwise.
pub const BINARY_CROSS_ENTROPY_WGSL: &str = include_str!("../../shaders/binary_cross_entropy.wgsl");
/// The bench's copy roofline (1 read + 1 write).
pub const BENCH_COPY_WGSL: &str = include_str!("../../shaders/bench_copy.wgsl");
/// The bench's read roofline (1 read).
pub const BENCH_READ_WGSL: &str = include_str!("../../shaders/bench_read.wgsl");

/// Every compute shader as (file name, complete source: shared prelude included), for
/// validation and tooling. One entry point, `main`, per shader.
pub fn shaders() -> Vec<(&'static str, String)> {
    let with_state = |s: &str| format!("{ROW_STATE_WGSL}\n{s}");
    vec![
        ("cross_entropy_rows.wgsl", rows_source(ElemFormat::F32, ROWS_CACHED, false)),
        ("cross_entropy_rows.wgsl (vec4)", rows_source(ElemFormat::Vec4, ROWS_CACHED, false)),
        ("cross_entropy_rows.wgsl (subgroups)", rows_source(ElemFormat::F32, ROWS_CACHED, true)),
        ("cross_entropy_rows.wgsl (vec4, subgroups)", rows_source(ElemFormat::Vec4, ROWS_CACHED, true)),
        (
            "cross_entropy_rows.wgsl (f16, f32 gradient)",
            rows_source(
                ElemFormat::Half { format: crate::HalfFormat::F16, half_grad: false, native: false },
                ROWS_CACHED,
                false,
            ),
        ),
        (
            "cross_entropy_rows.wgsl (native f16, f16 gradient)",
            rows_source(
                ElemFormat::Half { format: crate::HalfFormat::F16, half_grad: true, native: true },
                ROWS_CACHED,
                false,
            ),
        ),
        (
            "cross_entropy_rows.wgsl (bf16, bf16 gradient)",
            rows_source(
                ElemFormat::Half { format: crate::HalfFormat::Bf16, half_grad: true, native: false },
                ROWS_CACHED,
                false,
            ),
        ),
        ("row_partials.wgsl", with_state(ROW_PARTIALS_WGSL)),
        ("merge_partials.wgsl", with_state(MERGE_PARTIALS_WGSL)),
        ("cross_entropy_backward.wgsl", with_state(CROSS_ENTROPY_BACKWARD_WGSL)),
        ("row_weights.wgsl", ROW_WEIGHTS_WGSL.to_string()),
        ("narrow_targets.wgsl", NARROW_TARGETS_WGSL.to_string()),
        ("reduce_sum.wgsl", REDUCE_SUM_WGSL.to_string()),
        ("cross_entropy_soft.wgsl", with_state(CROSS_ENTROPY_SOFT_WGSL)),
        ("binary_cross_entropy.wgsl", BINARY_CROSS_ENTROPY_WGSL.to_string()),
        ("bench_copy.wgsl", BENCH_COPY_WGSL.to_string()),
        ("bench_read.wgsl", BENCH_READ_WGSL.to_string()),
    ]
}

/// The fused row kernel's source for an element format and a register cache of `cached`
/// floats per invocation, merging row states with subgroup operations when `subgroups`.
pub(crate) fn rows_source(format: ElemFormat, cached: u32, subgroups: bool) -> String {
    let (elem, width) = match format {
        ElemFormat::F32 => (ELEM_F32_WGSL.to_string(), 1),
        ElemFormat::Vec4 => (ELEM_VEC4_WGSL.to_string(), 4),
        ElemFormat::Half { format, half_grad, native } => {
            let storage = match (format, native) {
                (crate::HalfFormat::F16, true) => ELEM_F16_NATIVE_WGSL,
                (crate::HalfFormat::F16, false) => ELEM_F16_WGSL,
                (crate::HalfFormat::Bf16, _) => ELEM_BF16_WGSL,
            };
            let grad = if half_grad {
                "@group(0) @binding(5) var<storage, read_write> grad: array<u32>;\n\
                 fn store_grad(i: u32, e: Elem) { grad[i] = pack_elem(e); }\n"
            } else {
                "@group(0) @binding(5) var<storage, read_write> grad: array<vec2<f32>>;\n\
                 fn store_grad(i: u32, e: Elem) { grad[i] = e; }\n"
            };
            (format!("{ELEM_HALF_WGSL}\n{storage}\n{grad}"), 2)
        }
    };
    let kernel = CROSS_ENTROPY_ROWS_WGSL
        .replace("const CACHED: u32 = 8u;", &format!("const CACHED: u32 = {}u;", (cached / width).max(1)));
    let enable = match format {
        ElemFormat::Half { format: crate::HalfFormat::F16, native: true, .. } => "enable f16;\n",
        _ => "",
    };
    let merge = if subgroups { ROW_MERGE_SUBGROUP_WGSL } else { ROW_MERGE_WORKGROUP_WGSL };
    format!("{enable}{ROW_STATE_WGSL}\n{elem}\n{merge}\n{kernel}")
}

/// Gradient modes of the kernels (`GRAD_*` there).
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
    pub has_weights: u32,
    pub logit_scale: f32,
    pub softcap: f32,
    pub smoothing: f32,
    pub z_loss: f32,
    pub weight_total: f32,
    pub z_grad: f32,
}

/// `with_opts` for the parameter blocks that carry every option.
macro_rules! with_every_option {
    ($($params:ty),*) => {$(
        impl $params {
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
    )*};
}
with_every_option!(RowParams, BackwardParams);

/// Elements each invocation of `cross_entropy_rows.wgsl` keeps in registers on its
/// one-read path by default (`CACHED` there; the host may build it with another value).
pub(crate) const ROWS_CACHED: u32 = 32;

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
            f |= 1;
        }
        if self.smoothing != 0.0 {
            f |= 2;
        }
        if self.z_loss != 0.0 {
            f |= 4;
        }
        if self.softcap != 0.0 {
            f |= 8;
        }
        if self.logit_scale != 1.0 {
            f |= 16;
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
}

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
    pub _pad0: u32,
    pub _pad1: u32,
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
    /// Plain options, upstream gradient 1: the split and grid paths of PyTorch's loss.
    pub fn plain(self) -> Self {
        Self { logit_scale: 1.0, weight_total: self.classes as f32, ..self }
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
    pub flags: u32,
}

/// `Params` of `cross_entropy_soft.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub(crate) struct SoftParams {
    pub rows: u32,
    pub classes: u32,
    pub groups_x: u32,
    /// `FLAG_*` of the shader: gradient, saved LSE, per-row upstream.
    pub flags: u32,
    pub has_weights: u32,
    pub grad_scale: f32,
    pub logit_scale: f32,
    pub softcap: f32,
    pub smoothing: f32,
    pub z_loss: f32,
    pub weight_total: f32,
    pub _pad: u32,
}

/// `divisor_index` meaning "use the uniform divisor".
pub(crate) const NO_INDEX: u32 = u32::MAX;

/// Size of the largest parameter block; each dispatch's block sits at a multiple of
/// the uniform offset alignment above it.
pub(crate) const MAX_PARAMS_SIZE: u64 = 80;

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

/// A compute pipeline with its one bind group layout.
pub(crate) struct Kernel {
    pub layout: wgpu::BindGroupLayout,
    pub pipeline: wgpu::ComputePipeline,
    pub params_size: u64,
}

impl Kernel {
    pub(crate) fn new<P: Pod>(
        device: &wgpu::Device,
        name: &str,
        source: &str,
        storage: &[(bool, u64)],
        wg: u32,
    ) -> Self {
        let entries: Vec<_> =
            std::iter::once(uniform_entry(size_of::<P>())).chain(storage_entries(storage)).collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(name),
            entries: &entries,
        });
        Self::with_layout::<P>(device, name, source, layout, wg)
    }

    /// A pipeline for `source` with an existing bind group layout, so that variants of a
    /// kernel share one layout and one bind group.
    pub(crate) fn with_layout<P: Pod>(
        device: &wgpu::Device,
        name: &str,
        source: &str,
        layout: wgpu::BindGroupLayout,
        wg: u32,
    ) -> Self {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = pipeline(device, name, &module, &layout, &[("WG", f64::from(wg))]);
        Self { layout, pipeline, params_size: size_of::<P>() as u64 }
    }
}

fn pipeline(
    device: &wgpu::Device,
    name: &str,
    module: &wgpu::ShaderModule,
    layout: &wgpu::BindGroupLayout,
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
        entry_point: Some("main"),
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
    wg: u32,
    cached: u32,
    subgroups: bool,
    /// `ROW_LOOP`: workgroups take row groups in turn (`Tuning::max_workgroups` set).
    row_loop: bool,
    modules: std::sync::Mutex<std::collections::HashMap<ElemFormat, wgpu::ShaderModule>>,
    built: std::sync::Mutex<std::collections::HashMap<(ElemFormat, u32), wgpu::ComputePipeline>>,
}

impl RowsVariants {
    /// The pipeline for rows in `format` computing the options in `features`.
    pub fn get(&self, device: &wgpu::Device, format: ElemFormat, features: u32) -> wgpu::ComputePipeline {
        let mut built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        built
            .entry((format, features))
            .or_insert_with(|| {
                let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
                let module = modules.entry(format).or_insert_with(|| {
                    device.create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some("cross_entropy_rows"),
                        source: wgpu::ShaderSource::Wgsl(
                            rows_source(format, self.cached, self.subgroups).into(),
                        ),
                    })
                });
                pipeline(
                    device,
                    "cross_entropy_rows",
                    module,
                    &self.layout,
                    &[
                        ("WG", f64::from(self.wg)),
                        ("FEATURES", f64::from(features)),
                        ("ROW_LOOP", f64::from(u8::from(self.row_loop))),
                    ],
                )
            })
            .clone()
    }
}

pub(crate) const RO: bool = true;
pub(crate) const RW: bool = false;

/// Every pipeline the context needs, built once per device.
pub(crate) struct Kernels {
    /// The fused kernel's bind group layout (the pipelines are in `rows_variants`).
    pub rows: Kernel,
    pub rows_variants: RowsVariants,
    pub partials: Kernel,
    pub merge: Kernel,
    pub backward: Kernel,
    pub reduce: Kernel,
    pub weights: Kernel,
    pub narrow: Kernel,
    pub binary: Kernel,
    pub soft: Kernel,
    /// Workgroup size of every kernel (a power of two).
    pub workgroup_size: u32,
}

impl Kernels {
    pub fn new(device: &wgpu::Device, tuning: &super::tuning::Tuning) -> Self {
        let (wg, cached) = (tuning.workgroup_size, tuning.cached_per_thread);
        debug_assert!(wg.is_power_of_two());
        let subgroups = tuning.subgroups && device.features().contains(wgpu::Features::SUBGROUP);
        let src: std::collections::HashMap<_, _> = shaders().into_iter().collect();
        // logits (written in place), targets, row_loss, row_lse, grad, row_stats, norm,
        // weights.
        // Logits and grad have no minimum size: the scalar and vec4 variants share this
        // layout.
        let rows = Kernel::new::<RowParams>(
            device,
            "cross_entropy_rows",
            &rows_source(ElemFormat::F32, cached, subgroups),
            &[(RW, 0), (RO, 4), (RW, 4), (RW, 4), (RW, 0), (RW, 8), (RO, 4), (RO, 4)],
            wg,
        );
        let rows_variants = RowsVariants {
            layout: rows.layout.clone(),
            wg,
            cached,
            subgroups,
            row_loop: tuning.max_workgroups != 0,
            modules: Default::default(),
            built: Default::default(),
        };
        // The plain loss, both widths, up front: the common case never waits.
        rows_variants.get(device, ElemFormat::F32, 0);
        rows_variants.get(device, ElemFormat::Vec4, 0);
        Self {
            rows,
            rows_variants,
            partials: Kernel::new::<PartialParams>(
                device,
                "row_partials",
                &src["row_partials.wgsl"],
                // logits, targets, partials, weights
                &[(RO, 4), (RO, 4), (RW, 32), (RO, 4)],
                wg,
            ),
            merge: Kernel::new::<MergeParams>(
                device,
                "merge_partials",
                &src["merge_partials.wgsl"],
                // partials, targets, row_loss, row_lse, row_weight, row_stats, weights
                &[(RO, 32), (RO, 4), (RW, 4), (RW, 4), (RW, 4), (RW, 8), (RO, 4)],
                wg,
            ),
            backward: Kernel::new::<BackwardParams>(
                device,
                "cross_entropy_backward",
                &src["cross_entropy_backward.wgsl"],
                // logits (gradient in place), targets, row_stats, norm, grad, weights, upstream
                &[(RW, 4), (RO, 4), (RO, 8), (RO, 4), (RW, 4), (RO, 4), (RO, 4)],
                wg,
            ),
            // data
            reduce: Kernel::new::<ReduceParams>(
                device,
                "reduce_sum",
                &src["reduce_sum.wgsl"],
                &[(RW, 4)],
                wg,
            ),
            // targets, row_weight, weights
            weights: Kernel::new::<WeightParams>(
                device,
                "row_weights",
                &src["row_weights.wgsl"],
                &[(RO, 4), (RW, 4), (RO, 4)],
                wg,
            ),
            // i64 targets, i32 targets
            narrow: Kernel::new::<NarrowParams>(
                device,
                "narrow_targets",
                &src["narrow_targets.wgsl"],
                &[(RO, 8), (RW, 4)],
                wg,
            ),
            // logits, targets, weights, pos_weight, grad, losses, partials, upstream
            binary: Kernel::new::<BinaryParams>(
                device,
                "binary_cross_entropy",
                &src["binary_cross_entropy.wgsl"],
                &[(RO, 4), (RO, 4), (RO, 4), (RO, 4), (RW, 4), (RW, 4), (RW, 4), (RO, 4)],
                wg,
            ),
            // logits, probs, row_loss, row_lse (read for a saved LSE), grad, weights, upstream
            soft: Kernel::new::<SoftParams>(
                device,
                "cross_entropy_soft",
                &src["cross_entropy_soft.wgsl"],
                &[(RO, 4), (RO, 4), (RW, 4), (RW, 4), (RW, 4), (RO, 4), (RO, 4)],
                wg,
            ),
            workgroup_size: wg,
        }
    }
}
