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

impl Backend for GpuContext {
    fn cross_entropy_half(
        &self,
        l: &[u16],
        f: HalfFormat,
        v: usize,
        t: Targets<'_>,
        o: &LossOptions,
    ) -> Result<LossOutput> {
        GpuContext::cross_entropy_half(self, l, f, v, t, o)
    }
    fn cross_entropy_soft(&self, l: &[f32], v: usize, t: &[f32], o: &LossOptions) -> Result<LossOutput> {
        GpuContext::cross_entropy_soft(self, l, v, t, o)
    }
    fn binary_cross_entropy(&self, l: &[f32], v: usize, t: &[f32], o: &LossOptions) -> Result<LossOutput> {
        GpuContext::binary_cross_entropy(self, l, v, t, o)
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
        GpuContext::cross_entropy_backward(self, l, v, t, lse, up, o)
    }
    fn describe(&self) -> String {
        let info = self.adapter_info();
        format!("{} ({:?})", info.name, info.backend)
    }
    fn cross_entropy(&self, l: &[f32], v: usize, t: Targets<'_>, o: &LossOptions) -> Result<LossOutput> {
        GpuContext::cross_entropy(self, l, v, t, o)
    }
    fn cross_entropy_into(
        &self,
        l: &[f32],
        v: usize,
        t: Targets<'_>,
        o: &LossOptions,
        g: &mut [f32],
    ) -> Result<LossOutput> {
        GpuContext::cross_entropy_into(self, l, v, t, o, g)
    }
    fn cross_entropy_in_place(
        &self,
        l: &mut [f32],
        v: usize,
        t: Targets<'_>,
        o: &LossOptions,
    ) -> Result<LossOutput> {
        GpuContext::cross_entropy_in_place(self, l, v, t, o)
    }
}

/// The f64 CPU reference as a [`Backend`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Backend for Reference {
    fn cross_entropy_half(
        &self,
        l: &[u16],
        f: HalfFormat,
        v: usize,
        t: Targets<'_>,
        o: &LossOptions,
    ) -> Result<LossOutput> {
        cpu::reference::cross_entropy_half(l, f, v, t, o)
    }
    fn cross_entropy_soft(&self, l: &[f32], v: usize, t: &[f32], o: &LossOptions) -> Result<LossOutput> {
        cpu::reference::cross_entropy_soft(l, v, t, o)
    }
    fn binary_cross_entropy(&self, l: &[f32], v: usize, t: &[f32], o: &LossOptions) -> Result<LossOutput> {
        cpu::reference::binary_cross_entropy(l, v, t, o)
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
        cpu::reference::cross_entropy_backward(l, v, t, lse, up, o)
    }
    fn describe(&self) -> String {
        "cpu reference (f64)".into()
    }
    fn cross_entropy(&self, l: &[f32], v: usize, t: Targets<'_>, o: &LossOptions) -> Result<LossOutput> {
        cpu::reference::cross_entropy(l, v, t, o)
    }
    fn cross_entropy_into(
        &self,
        l: &[f32],
        v: usize,
        t: Targets<'_>,
        o: &LossOptions,
        g: &mut [f32],
    ) -> Result<LossOutput> {
        cpu::reference::cross_entropy_into(l, v, t, o, g)
    }
    fn cross_entropy_in_place(
        &self,
        l: &mut [f32],
        v: usize,
        t: Targets<'_>,
        o: &LossOptions,
    ) -> Result<LossOutput> {
        cpu::reference::cross_entropy_in_place(l, v, t, o)
    }
}

/// The fast multi-threaded CPU path as a [`Backend`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuFast;

impl Backend for CpuFast {
    fn cross_entropy_half(
        &self,
        l: &[u16],
        f: HalfFormat,
        v: usize,
        t: Targets<'_>,
        o: &LossOptions,
    ) -> Result<LossOutput> {
        cpu::fast::cross_entropy_half(l, f, v, t, o)
    }
    fn cross_entropy_soft(&self, l: &[f32], v: usize, t: &[f32], o: &LossOptions) -> Result<LossOutput> {
        cpu::fast::cross_entropy_soft(l, v, t, o)
    }
    fn binary_cross_entropy(&self, l: &[f32], v: usize, t: &[f32], o: &LossOptions) -> Result<LossOutput> {
        cpu::fast::binary_cross_entropy(l, v, t, o)
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
        cpu::fast::cross_entropy_backward(l, v, t, lse, up, o)
    }
    fn describe(&self) -> String {
        format!("cpu fast ({} threads)", rayon::current_num_threads())
    }
    fn cross_entropy(&self, l: &[f32], v: usize, t: Targets<'_>, o: &LossOptions) -> Result<LossOutput> {
        cpu::fast::cross_entropy(l, v, t, o)
    }
    fn cross_entropy_into(
        &self,
        l: &[f32],
        v: usize,
        t: Targets<'_>,
        o: &LossOptions,
        g: &mut [f32],
    ) -> Result<LossOutput> {
        cpu::fast::cross_entropy_into(l, v, t, o, g)
    }
    fn cross_entropy_in_place(
        &self,
        l: &mut [f32],
        v: usize,
        t: Targets<'_>,
        o: &LossOptions,
    ) -> Result<LossOutput> {
        cpu::fast::cross_entropy_in_place(l, v, t, o)
    }
}
