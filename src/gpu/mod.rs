//! The device side: the WGSL kernels ([`SHADERS`]) and [`GpuContext`], which owns a
//! device, its pipelines and buffers.

mod context;
mod kernels;

pub use context::{GpuContext, adapters, instance, select_adapters};
pub use kernels::{CROSS_ENTROPY_ROWS_WGSL, REDUCE_SUM_WGSL, SHADERS};
