//! The WGSL kernels, their parameter blocks and their bind group layouts, declared once
//! next to each other so that a shader and the layout that serves it cannot drift apart.

use std::num::NonZeroU64;

use bytemuck::{Pod, Zeroable};

/// The online-softmax monoid, prepended to every row kernel.
pub const ROW_STATE_WGSL: &str = include_str!("../../shaders/row_state.wgsl");
/// The fused row kernel: online softmax, row loss, LSE and the gradient.
pub const CROSS_ENTROPY_ROWS_WGSL: &str = include_str!("../../shaders/cross_entropy_rows.wgsl");
/// Partial (max, sum) states of column blocks, for rows split across dispatches.
pub const ROW_PARTIALS_WGSL: &str = include_str!("../../shaders/row_partials.wgsl");
/// Merges the block states of each row.
pub const MERGE_PARTIALS_WGSL: &str = include_str!("../../shaders/merge_partials.wgsl");
/// The gradient from saved row statistics, over a (row, column block) grid.
pub const CROSS_ENTROPY_BACKWARD_WGSL: &str =
    include_str!("../../shaders/cross_entropy_backward.wgsl");
/// One level of the deterministic tree sum used for `sum` and `mean`.
pub const REDUCE_SUM_WGSL: &str = include_str!("../../shaders/reduce_sum.wgsl");
/// The bench's copy roofline (1 read + 1 write).
pub const BENCH_COPY_WGSL: &str = include_str!("../../shaders/bench_copy.wgsl");
/// The bench's read roofline (1 read).
pub const BENCH_READ_WGSL: &str = include_str!("../../shaders/bench_read.wgsl");

/// Every compute shader as (file name, complete source: shared prelude included), for
/// validation and tooling. One entry point, `main`, per shader.
pub fn shaders() -> Vec<(&'static str, String)> {
    let with_state = |s: &str| format!("{ROW_STATE_WGSL}\n{s}");
    vec![
        (
            "cross_entropy_rows.wgsl",
            with_state(CROSS_ENTROPY_ROWS_WGSL),
        ),
        ("row_partials.wgsl", with_state(ROW_PARTIALS_WGSL)),
        ("merge_partials.wgsl", with_state(MERGE_PARTIALS_WGSL)),
        (
            "cross_entropy_backward.wgsl",
            with_state(CROSS_ENTROPY_BACKWARD_WGSL),
        ),
        ("reduce_sum.wgsl", REDUCE_SUM_WGSL.to_string()),
        ("bench_copy.wgsl", BENCH_COPY_WGSL.to_string()),
        ("bench_read.wgsl", BENCH_READ_WGSL.to_string()),
    ]
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
    pub _pad0: u32,
    pub _pad1: u32,
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

/// `divisor_index` meaning "use the uniform divisor".
pub(crate) const NO_INDEX: u32 = u32::MAX;

/// Size of the largest parameter block; each dispatch's block sits at a multiple of
/// the uniform offset alignment above it.
pub(crate) const MAX_PARAMS_SIZE: u64 = 48;

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
    kinds
        .iter()
        .enumerate()
        .map(|(i, &(read_only, min))| wgpu::BindGroupLayoutEntry {
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
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let entries: Vec<_> = std::iter::once(uniform_entry(size_of::<P>()))
            .chain(storage_entries(storage))
            .collect();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(name),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(name),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(name),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[("WG", f64::from(wg))],
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        Self {
            layout,
            pipeline,
            params_size: size_of::<P>() as u64,
        }
    }
}

pub(crate) const RO: bool = true;
pub(crate) const RW: bool = false;

/// Every pipeline the context needs, built once per device.
pub(crate) struct Kernels {
    pub rows: Kernel,
    pub partials: Kernel,
    pub merge: Kernel,
    pub backward: Kernel,
    pub reduce: Kernel,
    /// Workgroup size of every kernel (a power of two).
    pub workgroup_size: u32,
}

impl Kernels {
    pub fn new(device: &wgpu::Device, wg: u32) -> Self {
        debug_assert!(wg.is_power_of_two());
        let src: std::collections::HashMap<_, _> = shaders().into_iter().collect();
        Self {
            // logits (written in place), targets, row_loss, row_lse, grad, row_weight, row_stats
            rows: Kernel::new::<RowParams>(
                device,
                "cross_entropy_rows",
                &src["cross_entropy_rows.wgsl"],
                &[
                    (RW, 4),
                    (RO, 4),
                    (RW, 4),
                    (RW, 4),
                    (RW, 4),
                    (RW, 4),
                    (RW, 8),
                ],
                wg,
            ),
            // logits, targets, partials
            partials: Kernel::new::<PartialParams>(
                device,
                "row_partials",
                &src["row_partials.wgsl"],
                &[(RO, 4), (RO, 4), (RW, 16)],
                wg,
            ),
            // partials, targets, row_loss, row_lse, row_weight, row_stats
            merge: Kernel::new::<MergeParams>(
                device,
                "merge_partials",
                &src["merge_partials.wgsl"],
                &[(RO, 16), (RO, 4), (RW, 4), (RW, 4), (RW, 4), (RW, 8)],
                wg,
            ),
            // logits (written in place), targets, row_stats, norm, grad
            backward: Kernel::new::<BackwardParams>(
                device,
                "cross_entropy_backward",
                &src["cross_entropy_backward.wgsl"],
                &[(RW, 4), (RO, 4), (RO, 8), (RO, 4), (RW, 4)],
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
            workgroup_size: wg,
        }
    }
}
