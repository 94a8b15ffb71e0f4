//! Growable GPU buffers and the recording of dispatches with their parameter blocks.

use bytemuck::Pod;

use std::cell::RefCell;

use super::kernels::{Kernel, MAX_PARAMS_SIZE, RowsPipeline};

/// A GPU buffer that is reallocated only when a call needs more than it holds.
#[derive(Clone, Default)]
pub(crate) struct Slot {
    buffer: Option<wgpu::Buffer>,
}

impl Slot {
    /// Makes the buffer hold at least `size` bytes; returns true when it was (re)allocated.
    /// Capacity grows to the next power of two (up to `cap`) so that calls of a similar
    /// size reuse it.
    pub fn ensure(
        &mut self,
        device: &wgpu::Device,
        label: &str,
        usage: wgpu::BufferUsages,
        size: u64,
        cap: u64,
    ) -> bool {
        let size = size.max(16).next_multiple_of(16);
        if self.buffer.as_ref().is_some_and(|b| b.size() >= size) {
            return false;
        }
        let capacity = size.next_power_of_two().min(cap).max(size);
        self.buffer = Some(device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: capacity,
            usage,
            mapped_at_creation: false,
        }));
        true
    }

    /// Bytes of the buffer held (0 for none yet).
    pub fn bytes(&self) -> u64 {
        self.buffer.as_ref().map_or(0, wgpu::Buffer::size)
    }

    pub fn get(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("slot ensured before use")
    }
}

/// Grows the slots of a host path's workspace for a plan, counting the buffers it
/// creates: storage within one binding, `param_blocks` parameter blocks, readbacks.
pub(crate) struct Grow<'d> {
    device: &'d wgpu::Device,
    bind_cap: u64,
    buf_cap: u64,
    params_bytes: u64,
    created: u64,
}

impl<'d> Grow<'d> {
    pub fn new(device: &'d wgpu::Device, limits: &wgpu::Limits, param_blocks: u64) -> Self {
        Self {
            device,
            bind_cap: limits.max_storage_buffer_binding_size.min(limits.max_buffer_size),
            buf_cap: limits.max_buffer_size,
            params_bytes: params_stride(limits) * param_blocks,
            created: 0,
        }
    }

    fn ensure(&mut self, slot: &mut Slot, label: &str, usage: wgpu::BufferUsages, bytes: u64, cap: u64) {
        self.created += u64::from(slot.ensure(self.device, label, usage, bytes, cap));
    }

    /// A storage buffer (copied to and from) of at least `bytes`, within one binding.
    pub fn storage(&mut self, slot: &mut Slot, label: &str, bytes: u64) {
        use wgpu::BufferUsages as U;
        self.ensure(slot, label, U::STORAGE | U::COPY_SRC | U::COPY_DST, bytes, self.bind_cap);
    }

    /// The uniform buffer of the parameter blocks.
    pub fn params(&mut self, slot: &mut Slot, label: &str) {
        use wgpu::BufferUsages as U;
        self.ensure(slot, label, U::UNIFORM | U::COPY_DST, self.params_bytes, self.buf_cap);
    }

    /// The first `ring` readback buffers of `slots` (grown to that many), `bytes` each.
    pub fn readback(&mut self, slots: &mut Vec<Slot>, ring: usize, label: &str, bytes: u64) {
        use wgpu::BufferUsages as U;
        slots.resize_with(ring.max(slots.len()), Slot::default);
        for slot in &mut slots[..ring] {
            self.ensure(slot, label, U::MAP_READ | U::COPY_DST, bytes, self.buf_cap);
        }
    }

    /// Buffers created so far.
    pub fn created(&self) -> u64 {
        self.created
    }
}

/// Distance between parameter blocks in a uniform buffer.
pub(crate) fn params_stride(limits: &wgpu::Limits) -> u64 {
    MAX_PARAMS_SIZE.next_multiple_of(u64::from(limits.min_uniform_buffer_offset_alignment))
}

/// Splits `groups` workgroups into a 2D grid within the per-dimension limit.
pub(crate) fn fold_groups(groups: u64, max_per_dim: u32) -> (u32, u32) {
    let x = groups.min(u64::from(max_per_dim)).max(1);
    (x as u32, groups.div_ceil(x) as u32)
}

/// The `groups_x` a kernel must be told for `groups` workgroups.
pub(crate) fn groups_x(groups: u64, max_per_dim: u32) -> u32 {
    fold_groups(groups, max_per_dim).0
}

/// One dispatch, as [`trace`] saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// The kernel: its shader's name, and for the fused kernel the variant (element
    /// format, row merge, option features).
    pub kernel: String,
    /// Workgroups in x and y (a dispatch beyond the per-dimension limit folds into 2D).
    pub groups: [u32; 2],
}

thread_local! {
    static TRACE: RefCell<Option<Vec<Dispatch>>> = const { RefCell::new(None) };
}

/// Runs `work` and returns the dispatches it recorded on this thread, in order: for tests
/// that prove which kernels, variants and dispatch shapes a path took.
#[doc(hidden)]
pub fn trace<R>(work: impl FnOnce() -> R) -> (R, Vec<Dispatch>) {
    let outer = TRACE.with_borrow_mut(|t| t.replace(Vec::new()));
    let result = work();
    let seen = TRACE.with_borrow_mut(|t| std::mem::replace(t, outer)).unwrap_or_default();
    TRACE.with_borrow_mut(|t| {
        if let Some(outer) = t {
            outer.extend(seen.iter().cloned());
        }
    });
    (result, seen)
}

enum Encoder<'e> {
    Owned(wgpu::CommandEncoder),
    Borrowed(&'e mut wgpu::CommandEncoder),
}

/// Records dispatches, each with its parameter block (gathered into one upload at the
/// end), and copies, in order, into its own encoder or a caller's.
pub(crate) struct Recorder<'e> {
    encoder: Encoder<'e>,
    params: Vec<u8>,
    stride: u64,
    max_per_dim: u32,
}

impl<'e> Recorder<'e> {
    /// Records into a new encoder of `device`; finish with [`Recorder::submit`].
    pub fn new(device: &wgpu::Device, limits: &wgpu::Limits) -> Recorder<'static> {
        Recorder::with(Encoder::Owned(device.create_command_encoder(&Default::default())), limits)
    }

    /// Records into the caller's encoder; finish with [`Recorder::write_params`].
    pub fn into_encoder(encoder: &'e mut wgpu::CommandEncoder, limits: &wgpu::Limits) -> Self {
        Self::with(Encoder::Borrowed(encoder), limits)
    }

    fn with(encoder: Encoder<'e>, limits: &wgpu::Limits) -> Self {
        Self {
            encoder,
            params: Vec::new(),
            stride: params_stride(limits),
            max_per_dim: limits.max_compute_workgroups_per_dimension,
        }
    }

    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        match &mut self.encoder {
            Encoder::Owned(e) => e,
            Encoder::Borrowed(e) => e,
        }
    }

    /// Number of parameter blocks recorded.
    pub fn blocks(&self) -> u64 {
        self.params.len() as u64 / self.stride
    }

    /// Records `kernel` over `groups` workgroups (folded into 2D) with `params`.
    pub fn dispatch<P: Pod>(
        &mut self,
        kernel: &Kernel,
        bind_group: &wgpu::BindGroup,
        params: &P,
        groups: u64,
    ) {
        self.dispatch_named(kernel.name(), kernel.pipeline(), bind_group, params, groups);
    }

    /// Records a variant of the fused kernel over `groups` workgroups with `params`.
    pub fn dispatch_pipeline<P: Pod>(
        &mut self,
        rows: &RowsPipeline,
        bind_group: &wgpu::BindGroup,
        params: &P,
        groups: u64,
    ) {
        self.dispatch_named(&rows.name, &rows.pipeline, bind_group, params, groups);
    }

    /// Records `pipeline` (called `name` in a [`trace`]) over `groups` workgroups (folded
    /// into 2D) with `params`.
    fn dispatch_named<P: Pod>(
        &mut self,
        name: &str,
        pipeline: &wgpu::ComputePipeline,
        bind_group: &wgpu::BindGroup,
        params: &P,
        groups: u64,
    ) {
        let offset = self.params.len() as u64;
        self.params.extend_from_slice(bytemuck::bytes_of(params));
        self.params.resize((offset + self.stride) as usize, 0);
        let (gx, gy) = fold_groups(groups, self.max_per_dim);
        TRACE.with_borrow_mut(|t| {
            if let Some(t) = t {
                t.push(Dispatch { kernel: name.to_string(), groups: [gx, gy] });
            }
        });
        let mut pass = self.encoder().begin_compute_pass(&wgpu::ComputePassDescriptor::default());
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, bind_group, &[offset as u32]);
        pass.dispatch_workgroups(gx, gy, 1);
    }

    /// Records a buffer copy.
    pub fn copy(&mut self, src: &wgpu::Buffer, src_at: u64, dst: &wgpu::Buffer, dst_at: u64, bytes: u64) {
        if bytes > 0 {
            self.encoder().copy_buffer_to_buffer(src, src_at, dst, dst_at, bytes);
        }
    }

    /// Queues the parameter blocks for upload into `params`: applied at the next submit
    /// on the queue, before the recorded commands run.
    pub fn write_params(&self, queue: &wgpu::Queue, params: &wgpu::Buffer) {
        if !self.params.is_empty() {
            queue.write_buffer(params, 0, &self.params);
        }
    }

    /// Uploads the parameters into `params` and submits the recorder's own encoder.
    pub fn submit(self, queue: &wgpu::Queue, params: &wgpu::Buffer) -> wgpu::SubmissionIndex {
        self.write_params(queue, params);
        match self.encoder {
            Encoder::Owned(e) => queue.submit([e.finish()]),
            Encoder::Borrowed(_) => unreachable!("a caller's encoder is submitted by the caller"),
        }
    }
}

/// A bind group over `buffers` at bindings 1.. (whole buffers), with the uniform
/// parameter block of `kernel` at binding 0.
pub(crate) fn bind(
    device: &wgpu::Device,
    kernel: &Kernel,
    params: &wgpu::Buffer,
    buffers: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    bind_resources(device, kernel, params, buffers.iter().map(|b| b.as_entire_binding()))
}

/// Like [`bind`], with explicit (buffer, offset, size) ranges.
pub(crate) fn bind_ranges(
    device: &wgpu::Device,
    kernel: &Kernel,
    params: &wgpu::Buffer,
    ranges: &[(&wgpu::Buffer, u64, u64)],
) -> wgpu::BindGroup {
    let ranges = ranges.iter().map(|&(buffer, offset, size)| {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer,
            offset,
            size: wgpu::BufferSize::new(size),
        })
    });
    bind_resources(device, kernel, params, ranges)
}

/// The bind group of `kernel`: its parameter block at binding 0, `resources` at 1...
fn bind_resources<'a>(
    device: &wgpu::Device,
    kernel: &Kernel,
    params: &'a wgpu::Buffer,
    resources: impl Iterator<Item = wgpu::BindingResource<'a>>,
) -> wgpu::BindGroup {
    let params = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer: params,
        offset: 0,
        size: wgpu::BufferSize::new(kernel.params_size),
    });
    let entries: Vec<_> = std::iter::once(params)
        .chain(resources)
        .enumerate()
        .map(|(i, resource)| wgpu::BindGroupEntry { binding: i as u32, resource })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &kernel.layout,
        entries: &entries,
    })
}
