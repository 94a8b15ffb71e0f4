//! An engine that already holds logits and targets on the GPU: it opens its own device,
//! hands xent a clone, and lets xent record the loss and gradient into its own encoder —
//! no copies of the logits, no readback until it asks for the loss.
//!
//! Run: `cargo run --release --example device_resident`

use wgpu::util::DeviceExt;
use xent::gpu::{DeviceGradient, DeviceLabels, DeviceLogits, DeviceProblem, DeviceSlice, DeviceWorkspace};
use xent::{BackendExt, Dtype, GpuContext, LossOptions, Reduction};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The engine's own device.
    let instance = xent::gpu::instance();
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default()))?;
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        required_limits: adapter.limits(),
        ..Default::default()
    }))?;
    println!("engine device: {}", adapter.get_info().name);

    // The engine's own buffers: 1000 rows of a 32000-class vocabulary.
    let (rows, classes) = (1000, 32000);
    let logits: Vec<f32> = xent::synth::logits(rows, classes, 2.0, 1);
    // PyTorch's int64 class indices, as the engine holds them.
    let mut targets: Vec<i64> = xent::synth::targets(rows, classes, 1);
    targets[7] = -100; // padding token: ignored
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let logits_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("engine logits"),
        contents: bytemuck::cast_slice(&logits),
        usage,
    });
    let targets_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("engine targets"),
        contents: bytemuck::cast_slice(&targets),
        usage,
    });
    let grad_buf = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("engine grad"),
        size: (rows * classes * 4) as u64,
        usage,
        mapped_at_creation: false,
    });

    // xent records into the engine's encoder; the engine submits.
    let xent = GpuContext::from_device(device.clone(), queue.clone())?;
    let mut encoder = device.create_command_encoder(&Default::default());
    let problem = DeviceProblem {
        logits: DeviceLogits { buffer: &logits_buf, offset: 0, dtype: Dtype::F32 },
        rows,
        classes,
        labels: DeviceLabels::ClassesI64(DeviceSlice::new(&targets_buf, 0)),
        gradient: DeviceGradient::Into(DeviceSlice::new(&grad_buf, 0)),
        mode: Default::default(),
    };
    // Reused by every later recording: one shape, no new buffers.
    let mut workspace = DeviceWorkspace::new();
    let opts = LossOptions::new().reduction(Reduction::Mean);
    let out = xent.record(&mut encoder, &problem, &opts, &mut workspace)?;
    queue.submit([encoder.finish()]);

    // Read back only what we want to print.
    let loss = xent.read_device_loss(&out)?;
    let gradient = xent.read_device_buffer(&grad_buf, 5)?;
    println!("mean loss on the device: {loss:.6}");
    println!("first gradient values:   {gradient:?}");

    let reference = xent::Reference.cross_entropy(&logits, classes, &targets, &LossOptions::new())?;
    println!("f64 CPU reference:       {:.6}", reference.loss.unwrap_or(f32::NAN));
    Ok(())
}
