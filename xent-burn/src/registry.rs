//! Which burn wgpu devices xent runs on: each registered device's [`xent::GpuContext`],
//! built on burn's own wgpu device and queue, with the device-resident workspace its
//! recordings reuse.
//!
//! burn hands its wgpu handles out only when its runtime is initialised
//! (`WgpuOptions::init_with_setup`), and a lazy `Device::wgpu(..)` initialises on the first
//! tensor operation and keeps them, so xent takes part at that moment: [`init_wgpu`], or
//! [`register`] for an application that builds its own `WgpuSetup`.

use std::sync::{Arc, Mutex};

use burn::backend::DispatchDevice;
use burn::backend::wgpu::{WgpuDevice, WgpuSetup, wgpu};
use burn::tensor::Device;
use burn::tensor::wgpu::{WgpuInitError, WgpuOptions};
use xent::GpuContext;
use xent::gpu::DeviceWorkspace;

/// xent's side of one burn wgpu device.
pub(crate) struct Engine {
    pub ctx: GpuContext,
    /// The buffers of the device-resident recordings: one recording at a time, each
    /// submitted before the next is recorded (calls on one device are serialised here),
    /// and xent-burn's own buffers ([`Private`]).
    pub workspace: Mutex<(DeviceWorkspace, Private)>,
}

/// Buffers of xent-burn's own, reused across calls: burn places many tensors in one
/// `wgpu::Buffer`, and wgpu refuses one buffer bound read-only and read-write in the same
/// dispatch, so the small inputs a kernel reads (targets, saved LSE, upstream) are
/// copied here first, and a gradient whose buffer holds an input the kernel only reads
/// is written here and copied out.
#[derive(Default)]
pub(crate) struct Private {
    slots: [Option<wgpu::Buffer>; Private::COUNT],
    pub allocations: u64,
    pub bytes: u64,
}

impl Private {
    pub const TARGETS: usize = 0;
    pub const LSE: usize = 1;
    pub const UPSTREAM: usize = 2;
    pub const GRAD: usize = 3;
    const COUNT: usize = 4;

    /// Slot `i` with at least `bytes` (capacity in powers of two).
    pub fn buffer(&mut self, device: &wgpu::Device, i: usize, bytes: u64) -> wgpu::Buffer {
        let need = bytes.max(16).next_multiple_of(16);
        if let Some(b) = self.slots[i].as_ref().filter(|b| b.size() >= need) {
            return b.clone();
        }
        let size = need.next_power_of_two();
        let b = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent-burn private"),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.bytes = self.bytes - self.slots[i].as_ref().map_or(0, wgpu::Buffer::size) + size;
        self.allocations += 1;
        self.slots[i] = Some(b.clone());
        b
    }
}

static ENGINES: Mutex<Vec<(WgpuDevice, Arc<Engine>)>> = Mutex::new(Vec::new());

/// The wgpu device under a burn device (autodiff or not), if it is one.
pub(crate) fn wgpu_device_of(device: &Device) -> Option<WgpuDevice> {
    match device.clone().inner().as_dispatch() {
        DispatchDevice::Cube(burn::cubecl::Device::Wgpu(w)) => Some(w.clone()),
        _ => None,
    }
}

/// The engine of a wgpu device, if xent runs on it.
pub(crate) fn engine(device: &WgpuDevice) -> Option<Arc<Engine>> {
    let engines = ENGINES.lock().unwrap_or_else(|p| p.into_inner());
    engines.iter().find(|(d, _)| d == device).map(|(_, e)| e.clone())
}

/// Initialises burn's wgpu runtime with `options` and xent on the same device and queue;
/// returns burn's device (call `.autodiff()` on it to train). Fails as
/// `WgpuOptions::init_with_setup` does, e.g. when that runtime was already initialised
/// (by an earlier call or a tensor operation on a lazy `Device::wgpu(..)`).
pub fn init_wgpu(options: WgpuOptions) -> Result<Device, WgpuInitError> {
    let (device, setup) = options.init_with_setup()?;
    register(&device, &setup).map_err(|e| WgpuInitError::InvalidConfiguration { message: e.to_string() })?;
    Ok(device)
}

/// Lets xent run on a burn wgpu `device` whose runtime was initialised from `setup` (the
/// handles burn returned, or the ones it was given): xent's kernels then take that
/// device's losses. Registering a device again replaces its engine.
pub fn register(device: &Device, setup: &WgpuSetup) -> Result<(), xent::Error> {
    let wgpu = wgpu_device_of(device)
        .ok_or_else(|| xent::Error::InvalidOption(format!("{device:?} is not a burn wgpu device")))?;
    let ctx = GpuContext::from_device(setup.device.clone(), setup.queue.clone())?;
    let engine =
        Arc::new(Engine { ctx, workspace: Mutex::new((DeviceWorkspace::new(), Private::default())) });
    let mut engines = ENGINES.lock().unwrap_or_else(|p| p.into_inner());
    engines.retain(|(d, _)| *d != wgpu);
    engines.push((wgpu, engine));
    Ok(())
}

/// Whether xent's kernels compute the losses of tensors on `device` (a registered wgpu
/// device, with autodiff or without); elsewhere burn's own operations do.
pub fn is_accelerated(device: &Device) -> bool {
    wgpu_device_of(device).is_some_and(|d| engine(&d).is_some())
}

/// The number of buffers xent's workspace on `device` has created so far (repeated steps
/// of one shape create none); `None` where xent does not run.
pub fn xent_buffer_allocations(device: &Device) -> Option<u64> {
    let engine = engine(&wgpu_device_of(device)?)?;
    let ws = engine.workspace.lock().unwrap_or_else(|p| p.into_inner());
    Some(ws.0.buffer_allocations() + ws.1.allocations)
}

/// Device bytes of the buffers xent's workspace on `device` holds now; `None` where xent
/// does not run.
pub fn xent_device_bytes(device: &Device) -> Option<u64> {
    let engine = engine(&wgpu_device_of(device)?)?;
    let ws = engine.workspace.lock().unwrap_or_else(|p| p.into_inner());
    Some(ws.0.bytes() + ws.1.bytes)
}
