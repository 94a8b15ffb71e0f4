//! The device-resident API against the CPU reference, on every adapter: every cell of
//! the support matrix ({f32, f16, bf16} × {i32, i64 class indices, probabilities, binary}
//! × {loss, gradient into f32, in place, into half, backward}) under several option sets,
//! odd and even V, chunked on a device with tiny limits, and the empty batch.

mod common;

use common::Fixture;

use wgpu::util::DeviceExt;
use xent::check::{Tolerance, compare};
use xent::gpu::{
    DeviceGradient, DeviceLabels, DeviceLogits, DeviceMode, DeviceProblem, DeviceSlice, DeviceUpstream,
    DeviceWorkspace,
};
use xent::{
    Backend, Cell, Dtype, Error, GpuContext, Gradient, HalfFormat, LabelKind, Labels, Logits, LossOptions,
    LossOutput, Output, Problem, Reduction, Upstream, synth,
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
                        true => DeviceLabels::ClassesI64(DeviceSlice::from(&targets_buf)),
                        false => DeviceLabels::ClassesI32(DeviceSlice::from(&targets_buf)),
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
                            "into" => DeviceGradient::Into(DeviceSlice::from(&grad_buf)),
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
                        ..Default::default()
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
                labels: DeviceLabels::ClassesI64(DeviceSlice::from(&targets_buf)),
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
            labels: DeviceLabels::ClassesI64(DeviceSlice::from(&targets_buf)),
            gradient: DeviceGradient::Into(DeviceSlice::from(&grad_buf)),
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

#[test]
fn misaligned_or_short_device_buffers_are_errors() {
    for gpu in common::gpus("misaligned_or_short_device_buffers") {
        let logits = buffer(gpu, &[0u8; 4 * 10 * 4 + 4]);
        let targets = buffer(gpu, bytemuck::cast_slice(&[0i32, 1, 2, 3]));
        let mut problem = DeviceProblem {
            logits: DeviceLogits { buffer: &logits, offset: 4, dtype: Dtype::F32 },
            rows: 4,
            classes: 10,
            labels: DeviceLabels::ClassesI32(DeviceSlice::from(&targets)),
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
        problem.labels = DeviceLabels::ClassesI64(DeviceSlice::from(&targets));
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
                labels: DeviceLabels::ClassesI32(DeviceSlice::from(&targets_buf)),
                gradient: DeviceGradient::Into(DeviceSlice::from(&grad_buf)),
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

/// The labels of a device cell (class indices come as i32 or i64).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    I32,
    I64,
    Probabilities,
    Binary,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::I32, Kind::I64, Kind::Probabilities, Kind::Binary];
    fn label_kind(self) -> LabelKind {
        match self {
            Kind::I32 | Kind::I64 => LabelKind::Classes,
            Kind::Probabilities => LabelKind::Probabilities,
            Kind::Binary => LabelKind::Binary,
        }
    }
}

impl Fixture {
    /// The targets the host reference takes: a negative one (ignored on the device
    /// whatever ignore_index is) carries the options' ignore_index.
    fn host_targets(&self, opts: &LossOptions) -> Vec<i64> {
        self.targets.iter().map(|&t| if t < 0 { opts.get_ignore_index() } else { t }).collect()
    }
}

/// The option sets of a label kind.
fn option_sets(kind: Kind, classes: usize) -> Vec<(&'static str, LossOptions)> {
    let weights: Vec<f32> = (0..classes).map(|c| 0.25 + (c % 4) as f32 * 0.5).collect();
    match kind.label_kind() {
        LabelKind::Classes => vec![
            ("plain", LossOptions::new()),
            (
                "weights + smoothing + ignore_index 3, sum",
                LossOptions::new()
                    .reduction(Reduction::Sum)
                    .weights(weights.clone())
                    .label_smoothing(0.1)
                    .ignore_index(3),
            ),
            (
                "z-loss + weights under mean without n_items",
                LossOptions::new().weights(weights.clone()).z_loss(1e-2).label_smoothing(0.05),
            ),
            ("softcap + logit scale", LossOptions::new().softcap(5.0).logit_scale(1.5)),
            (
                "none + weights + z-loss",
                LossOptions::new().reduction(Reduction::None).weights(weights).z_loss(1e-2),
            ),
        ],
        LabelKind::Probabilities => vec![
            ("plain", LossOptions::new()),
            (
                "sum + weights + smoothing + z-loss",
                LossOptions::new()
                    .reduction(Reduction::Sum)
                    .weights(weights)
                    .label_smoothing(0.1)
                    .z_loss(1e-3),
            ),
            (
                "none + softcap + logit scale",
                LossOptions::new().reduction(Reduction::None).softcap(5.0).logit_scale(1.5),
            ),
            ("n_items", LossOptions::new().n_items(50.0)),
        ],
        LabelKind::Binary => vec![
            ("plain", LossOptions::new()),
            (
                "sum + weights + pos_weight",
                LossOptions::new()
                    .reduction(Reduction::Sum)
                    .weights(weights.clone())
                    .pos_weight(weights.clone()),
            ),
            ("none + pos_weight", LossOptions::new().reduction(Reduction::None).pos_weight(weights)),
            ("n_items", LossOptions::new().n_items(300.0)),
        ],
    }
}

/// What a device output should be compared on.
#[derive(Clone, Debug, Default)]
struct Got {
    loss: Option<f32>,
    row_losses: Option<Vec<f32>>,
    lse: Option<Vec<f32>>,
    gradient: Option<Vec<f32>>,
}

/// Bytes of 16-bit values, padded to whole words.
fn half_bytes(bits: &[u16]) -> Vec<u8> {
    let mut b: Vec<u8> = bytemuck::cast_slice(bits).to_vec();
    b.resize(b.len().next_multiple_of(4).max(4), 0);
    b
}

/// `count` 16-bit values from the start of a buffer.
fn read_half(gpu: &GpuContext, buffer: &wgpu::Buffer, count: usize) -> Vec<u16> {
    let words = gpu.read_device_buffer(buffer, count.div_ceil(2).max(1)).unwrap();
    bytemuck::cast_slice::<f32, u16>(&words)[..count].to_vec()
}

/// Runs one cell on the device, with the logits at an aligned offset inside a larger
/// buffer (guard values before and after, checked untouched).
fn device_cell(
    gpu: &GpuContext,
    f: &Fixture,
    kind: Kind,
    output: Output,
    opts: &LossOptions,
    saved_lse: Option<&[f32]>,
    ws: &mut DeviceWorkspace,
) -> xent::Result<Got> {
    let (n, v) = (f.rows, f.classes);
    let elems = n * v;
    let align = gpu.limits().min_storage_buffer_offset_alignment as usize;
    let half = f.dtype.half();
    // Logits at byte offset `align`, guards around them.
    let (logits_buf, guard) = match half {
        None => {
            let mut arena = vec![f32::NAN; align / 4];
            arena.extend_from_slice(&f.logits);
            arena.extend_from_slice(&[7.0; 4]);
            (buffer(gpu, bytemuck::cast_slice(&arena)), arena)
        }
        Some(_) => {
            let mut arena = vec![0x7e01u16; align / 2];
            arena.extend_from_slice(&f.bits);
            arena.extend_from_slice(&[0x3c01; 4]);
            let a: Vec<f32> = arena.iter().map(|&b| f32::from(b)).collect();
            (buffer(gpu, &half_bytes(&arena)), a)
        }
    };
    let t32: Vec<i32> = f.targets.iter().map(|&t| t as i32).collect();
    let labels_buf = match kind {
        Kind::I32 => buffer(gpu, bytemuck::cast_slice(&t32.iter().copied().chain([0]).collect::<Vec<_>>())),
        Kind::I64 => {
            buffer(gpu, bytemuck::cast_slice(&f.targets.iter().copied().chain([0]).collect::<Vec<_>>()))
        }
        Kind::Probabilities => {
            buffer(gpu, bytemuck::cast_slice(&f.probs.iter().copied().chain([0.0]).collect::<Vec<_>>()))
        }
        Kind::Binary => {
            buffer(gpu, bytemuck::cast_slice(&f.binary.iter().copied().chain([0.0]).collect::<Vec<_>>()))
        }
    };
    let labels = match kind {
        Kind::I32 => DeviceLabels::ClassesI32(DeviceSlice::from(&labels_buf)),
        Kind::I64 => DeviceLabels::ClassesI64(DeviceSlice::from(&labels_buf)),
        Kind::Probabilities => DeviceLabels::Probabilities(DeviceSlice::from(&labels_buf)),
        Kind::Binary => DeviceLabels::Binary(DeviceSlice::from(&labels_buf)),
    };
    let grad_buf = buffer(gpu, &vec![0u8; (elems * 4).max(4)]);
    let lse_buf = buffer(
        gpu,
        bytemuck::cast_slice(&saved_lse.unwrap_or(&[0.0]).iter().copied().chain([0.0]).collect::<Vec<_>>()),
    );
    let upstream = match f.upstream(kind.label_kind(), opts.get_reduction()) {
        Upstream::Scalar(g) => (None, g),
        Upstream::PerRow(g) | Upstream::PerElement(g) => (
            Some(buffer(gpu, bytemuck::cast_slice(&g.iter().copied().chain([0.0]).collect::<Vec<_>>()))),
            0.0,
        ),
    };
    let mode = match output {
        Output::Backward => DeviceMode::Backward {
            lse: (kind != Kind::Binary).then_some(DeviceSlice::from(&lse_buf)),
            upstream: match (&upstream.0, kind) {
                (None, _) => DeviceUpstream::Scalar(upstream.1),
                (Some(b), Kind::Binary) => DeviceUpstream::PerElement(b.into()),
                (Some(b), _) => DeviceUpstream::PerRow(b.into()),
            },
        },
        _ => DeviceMode::Fused,
    };
    let gradient = match output {
        Output::Loss => DeviceGradient::None,
        Output::IntoF32 | Output::Backward => DeviceGradient::Into(DeviceSlice::from(&grad_buf)),
        Output::IntoHalf => DeviceGradient::IntoHalf(DeviceSlice::from(&grad_buf)),
        Output::InPlace => DeviceGradient::InPlace,
        Output::Owned => unreachable!("no owned gradient on the device"),
    };
    let problem = DeviceProblem {
        logits: DeviceLogits { buffer: &logits_buf, offset: align as u64, dtype: f.dtype },
        rows: n,
        classes: v,
        labels,
        gradient,
        mode,
    };
    let mut enc = gpu.device().create_command_encoder(&Default::default());
    let out = gpu.record(&mut enc, &problem, opts, ws)?;
    gpu.queue().submit([enc.finish()]);
    let backward = output == Output::Backward;
    let ce = kind != Kind::Binary;
    let reduced = opts.get_reduction() != Reduction::None;
    let row_values = if ce { n } else { elems };
    let mut got = Got {
        loss: (!backward && reduced).then(|| gpu.read_device_loss(&out).unwrap()),
        row_losses: (!backward && (ce || !reduced))
            .then(|| gpu.read_device_buffer(&out.row_loss, row_values).unwrap()),
        lse: (!backward && ce).then(|| gpu.read_device_buffer(&out.lse, n).unwrap()),
        gradient: None,
    };
    // The whole logits buffer after the call: the gradient in place, and the guards.
    let after: Vec<f32> = match half {
        None => gpu.read_device_buffer(&logits_buf, guard.len()).unwrap(),
        Some(_) => read_half(gpu, &logits_buf, guard.len()).iter().map(|&b| f32::from(b)).collect(),
    };
    let widen = |b: &[u16]| -> Vec<f32> { b.iter().map(|&x| half.unwrap().to_f32(x)).collect() };
    let inner = align / if half.is_some() { 2 } else { 4 };
    got.gradient = match output {
        Output::Loss => None,
        Output::IntoF32 | Output::Backward => Some(gpu.read_device_buffer(&grad_buf, elems).unwrap()),
        Output::IntoHalf => Some(widen(&read_half(gpu, &grad_buf, elems))),
        Output::InPlace => Some(match half {
            None => after[inner..inner + elems].to_vec(),
            Some(_) => widen(&after[inner..inner + elems].iter().map(|&x| x as u16).collect::<Vec<_>>()),
        }),
        Output::Owned => None,
    };
    // Nothing outside the logits changed; without a gradient in place, nothing at all.
    let untouched: Vec<usize> = if output == Output::InPlace {
        (0..inner).chain(inner + elems..guard.len()).collect()
    } else {
        (0..guard.len()).collect()
    };
    for i in untouched {
        assert!(
            after[i].to_bits() == guard[i].to_bits(),
            "{} {kind:?} {output:?}: logits buffer element {i} changed",
            common::name(gpu)
        );
    }
    Ok(got)
}

/// The f64 reference on the widened values, through the front door.
fn reference_cell(f: &Fixture, kind: Kind, output: Output, opts: &LossOptions, lse: Option<&[f32]>) -> Got {
    let targets = f.host_targets(opts);
    let labels = match kind {
        Kind::I32 | Kind::I64 => Labels::from(&targets),
        Kind::Probabilities => Labels::Probabilities(&f.probs),
        Kind::Binary => Labels::Binary(&f.binary),
    };
    let mut grad = vec![f32::NAN; f.logits.len()];
    let ce = kind != Kind::Binary;
    let problem = Problem::new(Logits::F32(&f.logits), f.classes, labels);
    let problem = match output {
        Output::Backward => problem
            .gradient(Gradient::IntoF32(&mut grad))
            .backward(lse, f.upstream(kind.label_kind(), opts.get_reduction())),
        Output::Loss => problem.row_losses(true).lse(ce),
        _ => problem.row_losses(true).lse(ce).gradient(Gradient::IntoF32(&mut grad)),
    };
    let out = xent::Reference.evaluate(problem, opts).unwrap();
    let backward = output == Output::Backward;
    Got {
        loss: out.loss,
        row_losses: if backward { None } else { out.row_losses },
        lse: if backward { None } else { out.lse },
        gradient: (output != Output::Loss).then_some(grad),
    }
}

fn close(got: f32, want: f32, rtol: f32, atol: f32) -> bool {
    (got.is_nan() && want.is_nan()) || got == want || (got - want).abs() <= rtol * want.abs() + atol
}

/// The device's output against the reference's: the f32 tolerances (loss rtol 1e-5 with
/// an atol floor of 1e-6, gradient atol 1e-6), a half destination those of its type.
fn compare_cell(got: &Got, want: &Got, dtype: Dtype, output: Output) -> Result<(), String> {
    match (got.loss, want.loss) {
        (Some(a), Some(b)) if close(a, b, 1e-5, 1e-6) => {}
        (None, None) => {}
        (a, b) => return Err(format!("loss: got {a:?}, want {b:?}")),
    }
    for (what, a, b) in [("row losses", &got.row_losses, &want.row_losses), ("lse", &got.lse, &want.lse)] {
        match (a, b) {
            (Some(a), Some(b)) => {
                if let Some(i) = (0..b.len()).find(|&i| !close(a[i], b[i], 1e-5, 1e-6)) {
                    return Err(format!("{what}[{i}]: got {}, want {}", a[i], b[i]));
                }
            }
            (None, _) => {}
            (Some(_), None) => return Err(format!("{what}: the reference has none")),
        }
    }
    let half_out = matches!(output, Output::IntoHalf | Output::InPlace) && dtype != Dtype::F32;
    let (rtol, atol) = match (half_out, dtype) {
        (false, _) => (0.0, 1e-6),
        (true, Dtype::Bf16) => (1.6e-2, 1e-5),
        (true, _) => (1e-3, 1e-5),
    };
    match (&got.gradient, &want.gradient) {
        (Some(a), Some(b)) => {
            if let Some(i) = (0..a.len()).find(|&i| !close(a[i], b[i], rtol, atol)) {
                return Err(format!("gradient[{i}]: got {}, want {}", a[i], b[i]));
            }
        }
        (None, None) => {}
        _ => return Err("gradient present on one side only".into()),
    }
    Ok(())
}

/// The outputs of a cell of `dtype`: a half destination for half logits only.
fn outputs(dtype: Dtype) -> Vec<Output> {
    let mut o = vec![Output::Loss, Output::IntoF32, Output::InPlace, Output::Backward];
    if dtype != Dtype::F32 {
        o.push(Output::IntoHalf);
    }
    o
}

/// The saved LSE of a cross-entropy backward: the reference's, rounded to f32.
fn saved_lse(f: &Fixture, kind: Kind, opts: &LossOptions) -> Option<Vec<f32>> {
    (kind != Kind::Binary).then(|| reference_cell(f, kind, Output::Loss, opts, None).lse.unwrap())
}

/// Walks every device cell over the shapes on `gpu`; returns the failures.
fn walk_cells(gpu: &GpuContext, shapes: &[(usize, usize)], ws: &mut DeviceWorkspace) -> Vec<String> {
    let mut failures = Vec::new();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
        for &(n, v) in shapes {
            let f = Fixture::new(n, v, dtype, 17 + v as u64);
            for kind in Kind::ALL {
                for (name, opts) in option_sets(kind, v) {
                    let lse = saved_lse(&f, kind, &opts);
                    for output in outputs(dtype) {
                        let cell =
                            Cell { input: xent::Input::Logits, dtype, labels: kind.label_kind(), output };
                        let what = format!("{} {cell} ({kind:?}, {n}x{v}, {name})", common::name(gpu));
                        let want = reference_cell(&f, kind, output, &opts, lse.as_deref());
                        match device_cell(gpu, &f, kind, output, &opts, lse.as_deref(), ws) {
                            Ok(got) => {
                                if let Err(e) = compare_cell(&got, &want, dtype, output) {
                                    failures.push(format!("{what}: {e}"));
                                }
                            }
                            Err(e) => failures.push(format!("{what}: error {e}")),
                        }
                    }
                }
            }
        }
    }
    failures
}

#[test]
fn every_device_cell_matches_the_reference_on_every_adapter() {
    for gpu in common::gpus("every_device_cell_matches_the_reference") {
        let mut ws = DeviceWorkspace::new();
        // Even and odd V (odd half rows start mid-word); 3 long rows take the row grid.
        let failures = walk_cells(gpu, &[(37, 50), (29, 33), (3, 2100)], &mut ws);
        assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    }
}

#[test]
fn every_device_cell_matches_the_reference_in_chunks_on_a_tiny_device() {
    let Some(tiny) = common::tiny_device(common::gpus("device_cells_in_chunks_on_a_tiny_device")) else {
        return;
    };
    let mut ws = DeviceWorkspace::new();
    // 64 KiB bindings and 7 workgroups a dimension: several chunks of rows, of elements.
    let failures = walk_cells(&tiny, &[(300, 70), (211, 67)], &mut ws);
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn an_empty_batch_gives_nan_for_mean_and_zero_for_sum_on_the_device() {
    for gpu in common::gpus("an_empty_batch_on_the_device") {
        let mut ws = DeviceWorkspace::new();
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let f = Fixture::new(0, 5, dtype, 3);
            for kind in Kind::ALL {
                for (reduction, want) in [(Reduction::Mean, f32::NAN), (Reduction::Sum, 0.0)] {
                    let opts = LossOptions::new().reduction(reduction);
                    for output in [Output::Loss, Output::IntoF32, Output::InPlace] {
                        let got = device_cell(gpu, &f, kind, output, &opts, None, &mut ws).unwrap();
                        let loss = got.loss.unwrap();
                        assert!(
                            loss.to_bits() == want.to_bits() || (loss.is_nan() && want.is_nan()),
                            "{kind:?} {reduction:?} {output:?}: {loss}"
                        );
                        let host = reference_cell(&f, kind, output, &opts, None).loss.unwrap();
                        assert_eq!(
                            host.is_nan(),
                            loss.is_nan(),
                            "{kind:?} {reduction:?}: the reference gives {host}"
                        );
                    }
                }
            }
        }
    }
}

/// Repeated recordings of one shape reuse the workspace's buffers, in every kind and
/// output, half logits (widened chunks, half gradients) included.
#[test]
fn repeated_recordings_of_every_cell_create_no_buffer() {
    for gpu in common::gpus("repeated_recordings_of_every_cell") {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::Bf16] {
            for v in [50, 33] {
                let f = Fixture::new(23, v, dtype, 5);
                for kind in Kind::ALL {
                    for (name, opts) in option_sets(kind, v) {
                        let lse = saved_lse(&f, kind, &opts);
                        for output in outputs(dtype) {
                            let mut ws = DeviceWorkspace::new();
                            let mut after_first = 0;
                            for i in 0..3 {
                                device_cell(gpu, &f, kind, output, &opts, lse.as_deref(), &mut ws).unwrap();
                                if i == 0 {
                                    after_first = ws.buffer_allocations();
                                }
                            }
                            assert_eq!(
                                ws.buffer_allocations(),
                                after_first,
                                "{} {dtype:?} {kind:?} {output:?} {name}: later recordings created buffers",
                                common::name(gpu)
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Inputs a cell cannot take are typed errors, before anything is recorded.
#[test]
fn device_inputs_that_do_not_fit_the_cell_are_typed_errors() {
    for gpu in common::gpus("device_inputs_that_do_not_fit_the_cell") {
        let logits = buffer(gpu, &[0u8; 4 * 10 * 4]);
        let dense = buffer(gpu, &[0u8; 4 * 10 * 4]);
        let mut ws = DeviceWorkspace::new();
        let base = DeviceProblem {
            logits: DeviceLogits { buffer: &logits, offset: 0, dtype: Dtype::F32 },
            rows: 4,
            classes: 10,
            labels: DeviceLabels::ClassesI32(DeviceSlice::from(&dense)),
            gradient: DeviceGradient::None,
            mode: Default::default(),
        };
        let backward = |lse, upstream| DeviceMode::Backward { lse, upstream };
        let cases: Vec<(&str, DeviceProblem<'_>, LossOptions)> = vec![
            (
                "f32 logits into half",
                DeviceProblem { gradient: DeviceGradient::IntoHalf(DeviceSlice::from(&dense)), ..base },
                LossOptions::new(),
            ),
            (
                "backward without a gradient",
                DeviceProblem {
                    mode: backward(Some(DeviceSlice::from(&dense)), DeviceUpstream::Scalar(1.0)),
                    ..base
                },
                LossOptions::new(),
            ),
            (
                "cross-entropy backward without an LSE",
                DeviceProblem {
                    mode: backward(None, DeviceUpstream::Scalar(1.0)),
                    gradient: DeviceGradient::InPlace,
                    ..base
                },
                LossOptions::new(),
            ),
            (
                "binary backward with an LSE",
                DeviceProblem {
                    labels: DeviceLabels::Binary(DeviceSlice::from(&dense)),
                    mode: backward(Some(DeviceSlice::from(&dense)), DeviceUpstream::Scalar(1.0)),
                    gradient: DeviceGradient::InPlace,
                    ..base
                },
                LossOptions::new(),
            ),
            (
                "binary backward per row",
                DeviceProblem {
                    labels: DeviceLabels::Binary(DeviceSlice::from(&dense)),
                    mode: backward(None, DeviceUpstream::PerRow(DeviceSlice::from(&dense))),
                    gradient: DeviceGradient::InPlace,
                    ..base
                },
                LossOptions::new(),
            ),
            ("pos_weight with class indices", base, LossOptions::new().pos_weight(vec![1.0; 10])),
            (
                "label smoothing with binary targets",
                DeviceProblem { labels: DeviceLabels::Binary(DeviceSlice::from(&dense)), ..base },
                LossOptions::new().label_smoothing(0.1),
            ),
        ];
        for (what, problem, opts) in cases {
            let mut enc = gpu.device().create_command_encoder(&Default::default());
            match gpu.record(&mut enc, &problem, &opts, &mut ws) {
                Err(Error::InvalidOption(_)) => {}
                other => panic!("{what}: expected InvalidOption, got {:?}", other.err()),
            }
        }
        // Probabilities are 4 bytes a logit.
        let short = buffer(gpu, &[0u8; 4 * 10 * 4 - 4]);
        let problem =
            DeviceProblem { labels: DeviceLabels::Probabilities(DeviceSlice::from(&short)), ..base };
        let mut enc = gpu.device().create_command_encoder(&Default::default());
        let e = gpu.record(&mut enc, &problem, &LossOptions::new(), &mut ws);
        assert!(matches!(e, Err(Error::Shape { .. })), "{:?}", e.err());
        let _ = HalfFormat::F16;
    }
}

/// Vocabulary shards of device-resident logits (`GpuContext::record_vocab_partials`,
/// `record_vocab_gradient`): each of 3 shards of a problem in its own buffer at an aligned
/// offset, the partials read back and merged, the loss from them and each shard's gradient
/// recorded into a device buffer — against the reference's unsharded loss and gradient,
/// under several option sets (class weights, smoothing, z-loss, softcap, none), on every
/// adapter.
#[test]
fn device_vocab_shards_match_the_reference() {
    use xent::gpu::DeviceShard;
    use xent::vocab::{VocabPartial, finish, states};
    let (n, v) = (53, 9001);
    let logits = synth::logits(n, v, 2.0, 77);
    let mut targets = synth::targets(n, v, 77);
    targets[5] = -100;
    let t32: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
    let weights: Vec<f32> = (0..v).map(|c| 0.5 + (c % 3) as f32).collect();
    let option_sets = [
        LossOptions::new(),
        LossOptions::new().weights(weights).label_smoothing(0.1).reduction(Reduction::Sum),
        LossOptions::new().z_loss(1e-3).softcap(20.0).reduction(Reduction::None),
    ];
    let cuts: Vec<std::ops::Range<usize>> = (0..3).map(|k| v * k / 3..v * (k + 1) / 3).collect();
    for gpu in common::gpus("device_vocab_shards_match_the_reference") {
        let align = gpu.limits().min_storage_buffer_offset_alignment as usize;
        let mut ws = DeviceWorkspace::new();
        let targets_buf = buffer(gpu, bytemuck::cast_slice(&t32));
        for opts in &option_sets {
            let want = reference(&logits, v, &targets, opts, true);
            let shards: Vec<(wgpu::Buffer, std::ops::Range<usize>)> = cuts
                .iter()
                .map(|c| {
                    let mut arena = vec![f32::NAN; align / 4];
                    arena.extend(logits.chunks(v).flat_map(|r| r[c.clone()].to_vec()));
                    (buffer(gpu, bytemuck::cast_slice(&arena)), c.clone())
                })
                .collect();
            fn shard_of<'a>(
                (b, c): &'a (wgpu::Buffer, std::ops::Range<usize>),
                t: &'a wgpu::Buffer,
                (at, n, v): (u64, usize, usize),
            ) -> DeviceShard<'a> {
                DeviceShard {
                    logits: DeviceSlice::new(b, at),
                    targets: DeviceSlice::new(t, 0),
                    rows: n,
                    columns: c.clone(),
                    classes: v,
                }
            }
            let shard = |s| shard_of(s, &targets_buf, (align as u64, n, v));
            let mut merged = vec![VocabPartial::EMPTY; n];
            for s in &shards {
                let mut enc = gpu.device().create_command_encoder(&Default::default());
                let p = gpu.record_vocab_partials(&mut enc, &shard(s), opts, &mut ws).unwrap();
                gpu.queue().submit([enc.finish()]);
                let got = gpu.read_vocab_partials(&p, n).unwrap();
                merged.iter_mut().zip(got).for_each(|(m, p)| *m = m.combine(p));
            }
            let mut out = finish(&merged, xent::Targets::I64(&targets), v, opts).unwrap();
            let mut grad = vec![f32::NAN; n * v];
            for s in &shards {
                let w = s.1.len();
                let g = buffer(gpu, &vec![0u8; n * w * 4]);
                let mut enc = gpu.device().create_command_encoder(&Default::default());
                let st = states(&merged);
                let t = xent::Targets::I64(&targets);
                gpu.record_vocab_gradient(
                    &mut enc,
                    &shard(s),
                    t,
                    &st,
                    Upstream::Scalar(1.0),
                    opts,
                    (&g).into(),
                    &mut ws,
                )
                .unwrap();
                gpu.queue().submit([enc.finish()]);
                let part = gpu.read_device_buffer(&g, n * w).unwrap();
                for (row, p) in grad.chunks_mut(v).zip(part.chunks(w)) {
                    row[s.1.clone()].copy_from_slice(p);
                }
            }
            out.gradient = Some(grad);
            let none = opts.get_reduction() == Reduction::None;
            let got =
                LossOutput { row_losses: out.row_losses.filter(|_| none), lse: None, z_loss: None, ..out };
            let want = LossOutput {
                row_losses: want.row_losses.clone().filter(|_| none),
                lse: None,
                z_loss: None,
                ..want
            };
            compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{}: {e}", common::name(gpu)));
        }
        // A misaligned shard is refused before anything is recorded.
        let b = buffer(gpu, &vec![0u8; (n * 10 + 4) * 4]);
        let bad = DeviceShard {
            logits: DeviceSlice::new(&b, 4),
            targets: DeviceSlice::new(&targets_buf, 0),
            rows: n,
            columns: 0..10,
            classes: v,
        };
        let mut enc = gpu.device().create_command_encoder(&Default::default());
        let e = gpu.record_vocab_partials(&mut enc, &bad, &LossOptions::new(), &mut ws).err().unwrap();
        assert!(matches!(e, Error::InvalidOption(_)), "{e}");
    }
}
