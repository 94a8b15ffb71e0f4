//! The WGSL kernels, their parameter blocks and their bind group layouts, declared once
//! next to each other so that a shader and the layout that serves it cannot drift apart.

use std::num::NonZeroU64;

use bytemuck::{Pod, Zeroable};

/// The fused row kernel: online softmax, row loss, LSE and the gradient.
pub const CROSS_ENTROPY_ROWS_WGSL: &str = include_str!("../../shaders/cross_entropy_rows.wgsl");
/// One level of the deterministic tree sum used for `sum` and `mean`.
pub const REDUCE_SUM_WGSL: &str = include_str!("../../shaders/reduce_sum.wgsl");

/// Every shader of the crate as (file name, source), for validation and tooling.
pub const SHADERS: &[(&str, &str)] = &[
    ("cross_entropy_rows.wgsl", CROSS_ENTROPY_ROWS_WGSL),
    ("reduce_sum.wgsl", REDUCE_SUM_WGSL),
];

/// Gradient modes of `cross_entropy_rows.wgsl` (`GRAD_*` there).
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
    pub _pad0: u32,
    pub _pad1: u32,
}

fn uniform_entry(binding: u32, size: usize) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
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

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: NonZeroU64::new(4),
        },
        count: None,
    }
}

/// A compute pipeline with its one bind group layout.
pub(crate) struct Kernel {
    pub layout: wgpu::BindGroupLayout,
    pub pipeline: wgpu::ComputePipeline,
}

impl Kernel {
    fn new(
        device: &wgpu::Device,
        name: &str,
        source: &str,
        entries: &[wgpu::BindGroupLayoutEntry],
        workgroup_size: u32,
    ) -> Self {
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(name),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(name),
            entries,
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
                constants: &[("WG", f64::from(workgroup_size))],
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        Self { layout, pipeline }
    }
}

/// Every pipeline the context needs, built once per device.
pub(crate) struct Kernels {
    pub rows: Kernel,
    pub reduce: Kernel,
    /// Workgroup size of both kernels (a power of two).
    pub workgroup_size: u32,
}

impl Kernels {
    pub fn new(device: &wgpu::Device, workgroup_size: u32) -> Self {
        debug_assert!(workgroup_size.is_power_of_two());
        let rows = Kernel::new(
            device,
            "cross_entropy_rows",
            CROSS_ENTROPY_ROWS_WGSL,
            &[
                uniform_entry(0, size_of::<RowParams>()),
                storage_entry(1, false), // logits (written when the gradient is in place)
                storage_entry(2, true),  // targets
                storage_entry(3, false), // row_loss
                storage_entry(4, false), // row_lse
                storage_entry(5, false), // grad
            ],
            workgroup_size,
        );
        let reduce = Kernel::new(
            device,
            "reduce_sum",
            REDUCE_SUM_WGSL,
            &[
                uniform_entry(0, size_of::<ReduceParams>()),
                storage_entry(1, false),
            ],
            workgroup_size,
        );
        Self {
            rows,
            reduce,
            workgroup_size,
        }
    }
}
