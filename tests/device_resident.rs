//! The device-resident API against the CPU reference, on every adapter.

mod common;

use wgpu::util::DeviceExt;
use xent::check::{Tolerance, compare};
use xent::gpu::{DeviceBatch, DeviceGradient};
use xent::{GpuContext, LossOptions, LossOutput, Reduction, synth};

fn buffer(gpu: &GpuContext, data: &[u8]) -> wgpu::Buffer {
    gpu.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: data,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    })
}

#[test]
fn device_buffers_in_and_out_match_the_reference() {
    for (n, v) in [(77, 1003), (3, 20000)] {
        device_case(n, v);
    }
}

fn device_case(n: usize, v: usize) {
    let logits = synth::logits(n, v, 2.0, 41);
    let mut targets = synth::targets(n, v, 41);
    targets[n / 2] = -100;
    targets[n - 1] = -100;
    let t32: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
    for gpu in common::gpus("device_buffers_in_and_out") {
        // Logits at an aligned offset inside a larger buffer, as an engine's arena would.
        let align = gpu.limits().min_storage_buffer_offset_alignment as usize;
        let pad = 2 * align / 4;
        let mut arena = vec![f32::NAN; pad];
        arena.extend_from_slice(&logits);
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            for mode in ["none", "into", "in place"] {
                let what = format!("{} {reduction:?} {mode}", common::name(gpu));
                let logits_buf = buffer(gpu, bytemuck::cast_slice(&arena));
                let targets_buf = buffer(gpu, bytemuck::cast_slice(&t32));
                let grad_buf = buffer(gpu, &vec![0u8; n * v * 4]);
                let batch = DeviceBatch {
                    logits: &logits_buf,
                    logits_offset: (pad * 4) as u64,
                    targets: &targets_buf,
                    targets_offset: 0,
                    rows: n,
                    classes: v,
                    ignore_index: -100,
                };
                let gradient = match mode {
                    "none" => DeviceGradient::None,
                    "into" => DeviceGradient::Into { buffer: &grad_buf, offset: 0 },
                    _ => DeviceGradient::InPlace,
                };
                let mut enc = gpu.device().create_command_encoder(&Default::default());
                let out = gpu
                    .record_cross_entropy(
                        &mut enc,
                        &batch,
                        &LossOptions::new().reduction(reduction),
                        gradient,
                    )
                    .unwrap();
                gpu.queue().submit([enc.finish()]);

                let opts = LossOptions::new()
                    .reduction(reduction)
                    .gradient(mode != "none")
                    .row_losses(true)
                    .lse(true);
                let want = xent::cpu::reference::cross_entropy(&logits, v, &targets, &opts).unwrap();
                let loss = gpu.read_device_loss(&out).unwrap();
                let got = LossOutput {
                    loss: (reduction != Reduction::None).then_some(loss),
                    row_losses: Some(gpu.read_device_buffer(&out.row_loss, n).unwrap()),
                    lse: Some(gpu.read_device_buffer(&out.lse, n).unwrap()),
                    gradient: match mode {
                        "none" => None,
                        "into" => Some(gpu.read_device_buffer(&grad_buf, n * v).unwrap()),
                        _ => Some(gpu.read_device_buffer(&logits_buf, pad + n * v).unwrap()[pad..].to_vec()),
                    },
                };
                compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
                let count = gpu.read_device_buffer(&out.loss, 2).unwrap()[1];
                assert_eq!(count, (n - 2) as f32, "{what}: non-ignored rows counted on the device");
            }
        }
    }
}

#[test]
fn misaligned_or_short_device_buffers_are_errors() {
    for gpu in common::gpus("misaligned_or_short_device_buffers") {
        let logits = buffer(gpu, &[0u8; 4 * 10 * 4 + 4]);
        let targets = buffer(gpu, bytemuck::cast_slice(&[0i32, 1, 2, 3]));
        let mut batch = DeviceBatch {
            logits: &logits,
            logits_offset: 4,
            targets: &targets,
            targets_offset: 0,
            rows: 4,
            classes: 10,
            ignore_index: -100,
        };
        let mut enc = gpu.device().create_command_encoder(&Default::default());
        let e = gpu.record_cross_entropy(&mut enc, &batch, &LossOptions::new(), DeviceGradient::None);
        assert!(
            matches!(e, Err(xent::Error::InvalidOption(ref m)) if m.contains("alignment")),
            "{:?}",
            e.err()
        );
        batch.logits_offset = 0;
        batch.rows = 5;
        let e = gpu.record_cross_entropy(&mut enc, &batch, &LossOptions::new(), DeviceGradient::None);
        assert!(matches!(e, Err(xent::Error::Shape { .. })), "{:?}", e.err());
    }
}

#[test]
fn device_path_takes_every_option() {
    // Whole rows per workgroup, and few long rows on the (row × column block) grid.
    for (n, v) in [(21, 300), (3, 9000)] {
        options_case(n, v);
    }
}

fn options_case(n: usize, v: usize) {
    let logits = synth::logits(n, v, 2.0, 44);
    let mut targets = synth::targets(n, v, 44);
    targets[2] = -100;
    let t32: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
    let weights: Vec<f32> = (0..v).map(|c| 0.25 + (c % 5) as f32 / 3.0).collect();
    for gpu in common::gpus("device_path_takes_every_option") {
        for (name, opts) in [
            ("weights", LossOptions::new().weights(weights.clone())),
            ("smoothing + weights", LossOptions::new().weights(weights.clone()).label_smoothing(0.2)),
            ("z-loss + softcap + scale", LossOptions::new().z_loss(1e-2).softcap(5.0).logit_scale(1.3)),
            ("n_items", LossOptions::new().n_items(64.0)),
            ("sum + smoothing", LossOptions::new().reduction(Reduction::Sum).label_smoothing(0.1)),
        ] {
            let logits_buf = buffer(gpu, bytemuck::cast_slice(&logits));
            let targets_buf = buffer(gpu, bytemuck::cast_slice(&t32));
            let grad_buf = buffer(gpu, &vec![0u8; n * v * 4]);
            let batch = DeviceBatch {
                logits: &logits_buf,
                logits_offset: 0,
                targets: &targets_buf,
                targets_offset: 0,
                rows: n,
                classes: v,
                ignore_index: -100,
            };
            let mut enc = gpu.device().create_command_encoder(&Default::default());
            let grad = DeviceGradient::Into { buffer: &grad_buf, offset: 0 };
            let out = gpu.record_cross_entropy(&mut enc, &batch, &opts, grad).unwrap();
            gpu.queue().submit([enc.finish()]);
            let want =
                xent::cpu::reference::cross_entropy(&logits, v, &targets, &opts.clone().gradient(true))
                    .unwrap();
            let got = LossOutput {
                loss: Some(gpu.read_device_loss(&out).unwrap()),
                gradient: Some(gpu.read_device_buffer(&grad_buf, n * v).unwrap()),
                ..Default::default()
            };
            compare(&got, &want, Tolerance::F32)
                .unwrap_or_else(|e| panic!("{name}, {n} x {v} on {}: {e}", common::name(gpu)));
        }
    }
}
