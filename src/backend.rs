//! [`Backend`]: the one interface every path implements, so that the CLI, `xent check`
//! and the tests treat the GPU and the CPU alike.

use crate::cpu;
use crate::error::Result;
use crate::gpu::GpuContext;
use crate::options::{HalfFormat, LossOptions, LossOutput, Targets, Upstream};

/// A way to evaluate the loss: the GPU, the CPU reference, ...
pub trait Backend: Send + Sync {
    /// A short description ("gpu: llvmpipe (Vulkan)", "reference").
    fn describe(&self) -> String;
    /// See [`GpuContext::cross_entropy`].
    fn cross_entropy(
        &self,
        logits: &[f32],
        classes: usize,
        targets: Targets<'_>,
        opts: &LossOptions,
    ) -> Result<LossOutput>;
    /// See [`GpuContext::cross_entropy_into`].
    fn cross_entropy_into(
        &self,
        logits: &[f32],
        classes: usize,
        targets: Targets<'_>,
        opts: &LossOptions,
        grad: &mut [f32],
    ) -> Result<LossOutput>;
    /// See [`GpuContext::cross_entropy_backward`].
    fn cross_entropy_backward(
        &self,
        logits: &[f32],
        classes: usize,
        targets: Targets<'_>,
        lse: &[f32],
        upstream: Upstream<'_>,
        opts: &LossOptions,
    ) -> Result<Vec<f32>>;
    /// See [`GpuContext::cross_entropy_half`].
    fn cross_entropy_half(
        &self,
        logits: &[u16],
        format: HalfFormat,
        classes: usize,
        targets: Targets<'_>,
        opts: &LossOptions,
    ) -> Result<LossOutput>;
    /// See [`GpuContext::cross_entropy_soft`].
    fn cross_entropy_soft(
        &self,
        logits: &[f32],
        classes: usize,
        targets: &[f32],
        opts: &LossOptions,
    ) -> Result<LossOutput>;
    /// See [`GpuContext::binary_cross_entropy`].
    fn binary_cross_entropy(
        &self,
        logits: &[f32],
        classes: usize,
        targets: &[f32],
        opts: &LossOptions,
    ) -> Result<LossOutput>;
    /// See [`GpuContext::cross_entropy_in_place`].
    fn cross_entropy_in_place(
        &self,
        logits: &mut [f32],
        classes: usize,
        targets: Targets<'_>,
        opts: &LossOptions,
    ) -> Result<LossOutput>;
}

/// Implements [`Backend`] by forwarding every method to the functions of the same names:
/// inherent methods for the GPU, free functions of a module for the CPU paths.
macro_rules! forward_backend {
    ($ty:ty, |$me:ident| $describe:expr, $($call:tt)+) => {
        impl Backend for $ty {
            fn describe(&self) -> String {
                let $me = self;
                $describe
            }
            fn cross_entropy(&self, l: &[f32], v: usize, t: Targets<'_>, o: &LossOptions) -> Result<LossOutput> {
                forward_backend!(@call self, $($call)+, cross_entropy(l, v, t, o))
            }
            fn cross_entropy_into(
                &self,
                l: &[f32],
                v: usize,
                t: Targets<'_>,
                o: &LossOptions,
                g: &mut [f32],
            ) -> Result<LossOutput> {
                forward_backend!(@call self, $($call)+, cross_entropy_into(l, v, t, o, g))
            }
            fn cross_entropy_backward(
                &self,
                l: &[f32],
                v: usize,
                t: Targets<'_>,
                lse: &[f32],
                up: Upstream<'_>,
                o: &LossOptions,
            ) -> Result<Vec<f32>> {
                forward_backend!(@call self, $($call)+, cross_entropy_backward(l, v, t, lse, up, o))
            }
            fn cross_entropy_half(
                &self,
                l: &[u16],
                f: HalfFormat,
                v: usize,
                t: Targets<'_>,
                o: &LossOptions,
            ) -> Result<LossOutput> {
                forward_backend!(@call self, $($call)+, cross_entropy_half(l, f, v, t, o))
            }
            fn cross_entropy_soft(&self, l: &[f32], v: usize, t: &[f32], o: &LossOptions) -> Result<LossOutput> {
                forward_backend!(@call self, $($call)+, cross_entropy_soft(l, v, t, o))
            }
            fn binary_cross_entropy(&self, l: &[f32], v: usize, t: &[f32], o: &LossOptions) -> Result<LossOutput> {
                forward_backend!(@call self, $($call)+, binary_cross_entropy(l, v, t, o))
            }
            fn cross_entropy_in_place(&self, l: &mut [f32], v: usize, t: Targets<'_>, o: &LossOptions) -> Result<LossOutput> {
                forward_backend!(@call self, $($call)+, cross_entropy_in_place(l, v, t, o))
            }
        }
    };
    (@call $self:ident, method, $name:ident($($arg:expr),*)) => { $self.$name($($arg),*) };
    (@call $self:ident, module $module:path, $name:ident($($arg:expr),*)) => {{
        use $module as m;
        m::$name($($arg),*)
    }};
}

forward_backend!(
    GpuContext,
    |gpu| format!("{} ({:?})", gpu.adapter_info().name, gpu.adapter_info().backend),
    method
);

/// The f64 CPU reference as a [`Backend`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

forward_backend!(Reference, |_r| "cpu reference (f64)".into(), module cpu::reference);

/// The fast multi-threaded CPU path as a [`Backend`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuFast;

forward_backend!(CpuFast, |_c| format!("cpu fast ({} threads)", rayon::current_num_threads()), module cpu::fast);
