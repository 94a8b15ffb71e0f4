//! An engine that already holds logits and targets on the GPU: it opens its own device,
//! hands xent a clone, and lets xent record the loss and gradient into its own encoder —
//! no copies of the logits, no readback until it asks for the loss.
//!
//! Run: `cargo run --release --example device_resident`

use wgpu::util::DeviceExt;
use xent::gpu::{DeviceBatch, DeviceGradient};
use xent::{GpuContext, LossOptions, Reduction};

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
    let mut targets: Vec<i32> = xent::synth::targets(rows, classes, 1).iter().map(|&t| t as i32).collect();
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
    let batch = DeviceBatch {
        logits: &logits_buf,
        logits_offset: 0,
        targets: &targets_buf,
        targets_offset: 0,
        rows,
        classes,
        ignore_index: -100,
    };
    let grad = DeviceGradient::Into { buffer: &grad_buf, offset: 0 };
    let out = xent.record_cross_entropy(
        &mut encoder,
        &batch,
        &LossOptions::new().reduction(Reduction::Mean),
        grad,
    )?;
    queue.submit([encoder.finish()]);

    // Read back only what we want to print.
    let loss = xent.read_device_loss(&out)?;
    let gradient = xent.read_device_buffer(&grad_buf, 5)?;
    println!("mean loss on the device: {loss:.6}");
    println!("first gradient values:   {gradient:?}");

    let t64: Vec<i64> = targets.iter().map(|&t| i64::from(t)).collect();
    let reference = xent::cpu::reference::cross_entropy(&logits, classes, &t64, &LossOptions::new())?;
    println!("f64 CPU reference:       {:.6}", reference.loss.unwrap_or(f32::NAN));
    Ok(())
}
