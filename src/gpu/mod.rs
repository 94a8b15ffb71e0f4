//! The device side: the WGSL kernels ([`shaders`]), the chunking [`Plan`], and
//! [`GpuContext`], which owns a device, its pipelines and buffers.

mod backward;
pub mod bench;
mod binary;
mod buffers;
mod context;
mod evaluate;
mod grid;
mod kernels;
mod linear;
mod linear_bench;
mod linear_plan;
mod metrics;
pub mod plan;
mod reduce;
mod resident;
mod ring;
mod soft;
mod stream;
pub mod tuning;
mod vocab;
mod vocab_device;
pub mod wgsl;
mod workspace;

#[doc(hidden)]
pub use buffers::{Dispatch, trace};
pub(crate) use context::check_grad_len;
pub use context::{GpuContext, adapters, instance, select_adapters};
pub use kernels::{ParamsField, ParamsLayout, Shader, shaders};
pub use linear::{HeadPath, HeadWork, LinearPlan};
#[doc(hidden)]
pub use linear_bench::HeadProduct;
pub use plan::{Chunk, GradKind, Layout, Plan, PlanLimits};
pub use resident::{
    DeviceGradient, DeviceLabels, DeviceLogits, DeviceLoss, DeviceMetrics, DeviceMode, DeviceProblem,
    DeviceSlice, DeviceUpstream, DeviceWorkspace,
};
pub use tuning::{GemmTuning, Tuning};
pub use vocab_device::{DevicePartials, DeviceShard};
