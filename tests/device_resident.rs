//! The device-resident API against the CPU reference, on every adapter.

mod common;

use wgpu::util::DeviceExt;
use xent::check::{Tolerance, compare};
use xent::gpu::{DeviceGradient, DeviceLabels, DeviceLogits, DeviceProblem, DeviceWorkspace};
use xent::{
    Backend, Cell, Dtype, Error, GpuContext, Gradient, LabelKind, Labels, Logits, LossOptions, LossOutput,
    Output, Problem, Reduction, synth,
};

fn buffer(gpu: &GpuContext, data: &[u8]) -> wgpu::Buffer {
    gpu.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: None,
        contents: data,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    })
}

/// The reference with the gradient owned when `gradient`, the row losses and the LSE.
fn reference(logits: &[f32], v: usize, targets: &[i64], opts: &LossOptions, gradient: bool) -> LossOutput {
    let g = if gradient { Gradient::Owned } else { Gradient::None };
    let problem =
        Problem::new(Logits::F32(logits), v, Labels::from(targets)).gradient(g).row_losses(true).lse(true);
    xent::Reference.evaluate(problem, opts).unwrap()
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
        let mut workspace = DeviceWorkspace::new();
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            for mode in ["none", "into", "in place"] {
                for wide in [false, true] {
                    let what = format!(
                        "{} {reduction:?} {mode} {}",
                        common::name(gpu),
                        if wide { "i64" } else { "i32" }
                    );
                    let logits_buf = buffer(gpu, bytemuck::cast_slice(&arena));
                    let targets_buf = match wide {
                        true => buffer(gpu, bytemuck::cast_slice(&targets)),
                        false => buffer(gpu, bytemuck::cast_slice(&t32)),
                    };
                    let grad_buf = buffer(gpu, &vec![0u8; n * v * 4]);
                    let labels = match wide {
                        true => DeviceLabels::ClassesI64 { buffer: &targets_buf, offset: 0 },
                        false => DeviceLabels::ClassesI32 { buffer: &targets_buf, offset: 0 },
                    };
                    let problem = DeviceProblem {
                        logits: DeviceLogits {
                            buffer: &logits_buf,
                            offset: (pad * 4) as u64,
                            dtype: Dtype::F32,
                        },
                        rows: n,
                        classes: v,
                        labels,
                        gradient: match mode {
                            "none" => DeviceGradient::None,
                            "into" => DeviceGradient::Into { buffer: &grad_buf, offset: 0 },
                            _ => DeviceGradient::InPlace,
                        },
                        mode: Default::default(),
                    };
                    let opts = LossOptions::new().reduction(reduction);
                    let mut enc = gpu.device().create_command_encoder(&Default::default());
                    let out = gpu.record(&mut enc, &problem, &opts, &mut workspace).unwrap();
                    gpu.queue().submit([enc.finish()]);

                    let want = reference(&logits, v, &targets, &opts, mode != "none");
                    let loss = gpu.read_device_loss(&out).unwrap();
                    let got = LossOutput {
                        loss: (reduction != Reduction::None).then_some(loss),
                        row_losses: Some(gpu.read_device_buffer(&out.row_loss, n).unwrap()),
                        lse: Some(gpu.read_device_buffer(&out.lse, n).unwrap()),
                        gradient: match mode {
                            "none" => None,
                            "into" => Some(gpu.read_device_buffer(&grad_buf, n * v).unwrap()),
                            _ => Some(
                                gpu.read_device_buffer(&logits_buf, pad + n * v).unwrap()[pad..].to_vec(),
                            ),
                        },
                        z_loss: None,
                    };
                    compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
                    let count = gpu.read_device_buffer(&out.loss, 2).unwrap()[1];
                    assert_eq!(count, (n - 2) as f32, "{what}: non-ignored rows counted on the device");
                }
            }
        }
    }
}

/// i64 targets that no i32 holds are ignored rows, as out-of-range ones; ignore_index comes
/// from the options, also a valid class and a value beyond i32.
#[test]
fn device_path_takes_i64_targets_and_the_options_ignore_index() {
    let (n, v) = (9, 40);
    let logits = synth::logits(n, v, 2.0, 45);
    for gpu in common::gpus("device_path_takes_i64_targets") {
        for ignore in [-100i64, 3, 1 << 40] {
            let targets: Vec<i64> = vec![3, 1 << 40, 7, -100, 3, (1 << 32) + 5, 39, 0, 3];
            let mut workspace = DeviceWorkspace::new();
            let logits_buf = buffer(gpu, bytemuck::cast_slice(&logits));
            let targets_buf = buffer(gpu, bytemuck::cast_slice(&targets));
            let problem = DeviceProblem {
                logits: DeviceLogits { buffer: &logits_buf, offset: 0, dtype: Dtype::F32 },
                rows: n,
                classes: v,
                labels: DeviceLabels::ClassesI64 { buffer: &targets_buf, offset: 0 },
                gradient: DeviceGradient::None,
                mode: Default::default(),
            };
            let opts = LossOptions::new().reduction(Reduction::Sum).ignore_index(ignore);
            let mut enc = gpu.device().create_command_encoder(&Default::default());
            let out = gpu.record(&mut enc, &problem, &opts, &mut workspace).unwrap();
            gpu.queue().submit([enc.finish()]);
            // The device ignores targets it cannot use; the host path would refuse them, so
            // the reference sees them as ignored rows.
            let host: Vec<i64> = targets
                .iter()
                .map(|&t| if t == ignore || !(0..v as i64).contains(&t) { ignore } else { t })
                .collect();
            let want = reference(&logits, v, &host, &opts, false);
            let got = gpu.read_device_buffer(&out.row_loss, n).unwrap();
            for (r, (&g, &w)) in got.iter().zip(want.row_losses.as_ref().unwrap()).enumerate() {
                assert!((g - w).abs() <= 1e-5 * w.abs() + 1e-6, "ignore {ignore}, row {r}: {g} vs {w}");
            }
        }
    }
}

#[test]
fn repeated_recordings_of_one_shape_create_no_buffer() {
    let (n, v) = (64, 500);
    let logits = synth::logits(n, v, 2.0, 46);
    let targets = synth::targets(n, v, 46);
    for gpu in common::gpus("repeated_recordings_create_no_buffer") {
        let logits_buf = buffer(gpu, bytemuck::cast_slice(&logits));
        let targets_buf = buffer(gpu, bytemuck::cast_slice(&targets));
        let grad_buf = buffer(gpu, &vec![0u8; n * v * 4]);
        let problem = DeviceProblem {
            logits: DeviceLogits { buffer: &logits_buf, offset: 0, dtype: Dtype::F32 },
            rows: n,
            classes: v,
            labels: DeviceLabels::ClassesI64 { buffer: &targets_buf, offset: 0 },
            gradient: DeviceGradient::Into { buffer: &grad_buf, offset: 0 },
            mode: Default::default(),
        };
        let opts = LossOptions::new();
        let mut workspace = DeviceWorkspace::new();
        let mut losses = Vec::new();
        let mut after_first = 0;
        for i in 0..4 {
            let mut enc = gpu.device().create_command_encoder(&Default::default());
            let out = gpu.record(&mut enc, &problem, &opts, &mut workspace).unwrap();
            gpu.queue().submit([enc.finish()]);
            losses.push(gpu.read_device_loss(&out).unwrap());
            if i == 0 {
                after_first = workspace.buffer_allocations();
            }
        }
        assert!(after_first > 0);
        assert_eq!(
            workspace.buffer_allocations(),
            after_first,
            "{}: later recordings created buffers",
            common::name(gpu)
        );
        let want = reference(&logits, v, &targets, &opts, false).loss.unwrap();
        for l in losses {
            assert_eq!(l.to_bits(), losses_first(&want, l), "{}: loss {l} vs {want}", common::name(gpu));
        }
    }
}

/// The loss is bit-identical across recordings; check it is also the reference's.
fn losses_first(want: &f32, got: f32) -> u32 {
    assert!((got - want).abs() <= 1e-5 * want.abs() + 1e-6, "{got} vs {want}");
    got.to_bits()
}

/// What the device path does not compute is a typed `Unsupported` naming the cell.
#[test]
fn device_path_names_the_cells_it_does_not_take() {
    for gpu in common::gpus("device_path_names_the_cells") {
        let logits = buffer(gpu, &[0u8; 4 * 10 * 4]);
        let targets = buffer(gpu, &[0u8; 4 * 10 * 4]);
        let mut workspace = DeviceWorkspace::new();
        let cases = [
            (Dtype::F16, DeviceLabels::ClassesI32 { buffer: &targets, offset: 0 }, LossOptions::new()),
            (Dtype::F32, DeviceLabels::Probabilities { buffer: &targets, offset: 0 }, LossOptions::new()),
            (Dtype::F32, DeviceLabels::Binary { buffer: &targets, offset: 0 }, LossOptions::new()),
            (
                Dtype::F32,
                DeviceLabels::ClassesI32 { buffer: &targets, offset: 0 },
                LossOptions::new().weights(vec![1.0; 10]).z_loss(1e-3),
            ),
        ];
        for (dtype, labels, opts) in cases {
            let problem = DeviceProblem {
                logits: DeviceLogits { buffer: &logits, offset: 0, dtype },
                rows: 4,
                classes: 10,
                labels,
                gradient: DeviceGradient::None,
                mode: Default::default(),
            };
            let mut enc = gpu.device().create_command_encoder(&Default::default());
            match gpu.record(&mut enc, &problem, &opts, &mut workspace) {
                Err(Error::Unsupported { path, cell, .. }) => {
                    assert_eq!(path, "device-resident");
                    assert_eq!(cell, problem.cell().to_string());
                }
                other => panic!("{}: expected Unsupported, got {:?}", problem.cell(), other.err()),
            }
        }
        let cell = Cell { dtype: Dtype::F16, labels: LabelKind::Classes, output: Output::Loss };
        assert_eq!(cell.to_string(), "float16 logits × class indices × loss only");
    }
}

#[test]
fn misaligned_or_short_device_buffers_are_errors() {
    for gpu in common::gpus("misaligned_or_short_device_buffers") {
        let logits = buffer(gpu, &[0u8; 4 * 10 * 4 + 4]);
        let targets = buffer(gpu, bytemuck::cast_slice(&[0i32, 1, 2, 3]));
        let mut problem = DeviceProblem {
            logits: DeviceLogits { buffer: &logits, offset: 4, dtype: Dtype::F32 },
            rows: 4,
            classes: 10,
            labels: DeviceLabels::ClassesI32 { buffer: &targets, offset: 0 },
            gradient: DeviceGradient::None,
            mode: Default::default(),
        };
        let mut workspace = DeviceWorkspace::new();
        let mut enc = gpu.device().create_command_encoder(&Default::default());
        let e = gpu.record(&mut enc, &problem, &LossOptions::new(), &mut workspace);
        assert!(matches!(e, Err(Error::InvalidOption(ref m)) if m.contains("alignment")), "{:?}", e.err());
        problem.logits.offset = 0;
        problem.rows = 5;
        let e = gpu.record(&mut enc, &problem, &LossOptions::new(), &mut workspace);
        assert!(matches!(e, Err(Error::Shape { .. })), "{:?}", e.err());
        // i64 targets are 8 bytes a row.
        problem.rows = 4;
        problem.labels = DeviceLabels::ClassesI64 { buffer: &targets, offset: 0 };
        let e = gpu.record(&mut enc, &problem, &LossOptions::new(), &mut workspace);
        assert!(matches!(e, Err(Error::Shape { .. })), "{:?}", e.err());
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
        let mut workspace = DeviceWorkspace::new();
        for (name, opts) in [
            ("weights", LossOptions::new().weights(weights.clone())),
            ("smoothing + weights", LossOptions::new().weights(weights.clone()).label_smoothing(0.2)),
            ("z-loss + softcap + scale", LossOptions::new().z_loss(1e-2).softcap(5.0).logit_scale(1.3)),
            (
                "z-loss + weights + n_items",
                LossOptions::new().z_loss(1e-2).weights(weights.clone()).n_items(17.0),
            ),
            ("n_items", LossOptions::new().n_items(64.0)),
            ("sum + smoothing", LossOptions::new().reduction(Reduction::Sum).label_smoothing(0.1)),
            ("ignore class 5", LossOptions::new().ignore_index(5)),
        ] {
            let logits_buf = buffer(gpu, bytemuck::cast_slice(&logits));
            let targets_buf = buffer(gpu, bytemuck::cast_slice(&t32));
            let grad_buf = buffer(gpu, &vec![0u8; n * v * 4]);
            let problem = DeviceProblem {
                logits: DeviceLogits { buffer: &logits_buf, offset: 0, dtype: Dtype::F32 },
                rows: n,
                classes: v,
                labels: DeviceLabels::ClassesI32 { buffer: &targets_buf, offset: 0 },
                gradient: DeviceGradient::Into { buffer: &grad_buf, offset: 0 },
                mode: Default::default(),
            };
            let mut enc = gpu.device().create_command_encoder(&Default::default());
            let out = gpu.record(&mut enc, &problem, &opts, &mut workspace).unwrap();
            gpu.queue().submit([enc.finish()]);
            // The device ignores negative targets whatever ignore_index is; the host path
            // refuses them, so its targets carry ignore_index there.
            let host: Vec<i64> =
                targets.iter().map(|&t| if t < 0 { opts.get_ignore_index() } else { t }).collect();
            let want = LossOutput {
                row_losses: None,
                lse: None,
                z_loss: None,
                ..reference(&logits, v, &host, &opts, true)
            };
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
