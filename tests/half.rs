//! Half-precision logits (f16, bf16 as raw bits): the GPU reads them packed and computes
//! in f32, so with an f32 gradient it must match the f32 reference on the widened values
//! under the f32 tolerances; a gradient in the logits' format must be that f32 result
//! rounded once (PyTorch's tolerances for the type).

mod common;

use xent::check::{Tolerance, compare};
use xent::{HalfFormat, LossOptions, LossOutput, Reduction, synth};

#[test]
fn conversions_round_trip_and_round_to_nearest_even() {
    let f = HalfFormat::F16;
    for (x, bits) in
        [(0.0f32, 0x0000u16), (1.0, 0x3c00), (-2.0, 0xc000), (65504.0, 0x7bff), (6.1035156e-5, 0x0400)]
    {
        assert_eq!(f.from_f32(x), bits, "{x}");
        assert_eq!(f.to_f32(bits), x);
    }
    assert_eq!(f.from_f32(f32::INFINITY), 0x7c00);
    assert_eq!(f.from_f32(f32::NEG_INFINITY), 0xfc00);
    assert!(f.to_f32(f.from_f32(f32::NAN)).is_nan());
    assert_eq!(f.from_f32(1.0 + 1.0 / 2048.0), 0x3c00, "a tie rounds to even");
    assert_eq!(f.to_f32(0x0001), 5.9604645e-8, "smallest subnormal");
    let b = HalfFormat::Bf16;
    assert_eq!(b.from_f32(1.0), 0x3f80);
    assert_eq!(b.to_f32(0xc040), -3.0);
    assert_eq!(b.from_f32(f32::from_bits(0x3f80_8000)), 0x3f80, "a tie rounds to even");
    for x in synth::logits(1, 1000, 3.0, 5) {
        for fmt in [f, b] {
            let back = fmt.to_f32(fmt.from_f32(x));
            let tol = if fmt == f { 4.9e-4 } else { 3.9e-3 };
            assert!((back - x).abs() <= tol * x.abs() + 1e-7, "{fmt:?} {x} -> {back}");
        }
    }
}

fn case(n: usize, v: usize, format: HalfFormat, seed: u64) -> (Vec<u16>, Vec<f32>, Vec<i64>) {
    let mut logits = synth::logits(n, v, 3.0, seed);
    if v > 4 {
        logits[1] = f32::NEG_INFINITY; // a masked class
    }
    let bits: Vec<u16> = logits.iter().map(|&x| format.from_f32(x)).collect();
    let wide: Vec<f32> = bits.iter().map(|&h| format.to_f32(h)).collect();
    let mut targets = synth::targets(n, v, seed);
    if v > 4 && targets[0] == 1 {
        targets[0] = 0;
    }
    if n > 2 {
        targets[1] = -100;
    }
    (bits, wide, targets)
}

fn within_type(got: &[u16], want: &[f32], format: HalfFormat) -> Result<(), String> {
    let (rtol, atol) = match format {
        HalfFormat::F16 => (1e-3, 1e-5),
        HalfFormat::Bf16 => (1.6e-2, 1e-5),
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = format.to_f32(g);
        if (g - w).abs() > rtol * w.abs() + atol {
            return Err(format!("gradient[{i}]: got {g}, want {w}"));
        }
    }
    Ok(())
}

#[test]
fn half_logits_match_the_reference_on_every_gpu() {
    for gpu in common::gpus("half_logits_match_the_reference") {
        for format in [HalfFormat::F16, HalfFormat::Bf16] {
            for (n, v) in [(1usize, 2usize), (7, 30), (33, 1000), (3, 32000), (70, 258)] {
                let (bits, wide, targets) = case(n, v, format, 7 + v as u64);
                for opts in [
                    LossOptions::new().gradient(true),
                    LossOptions::new()
                        .reduction(Reduction::Sum)
                        .weights((0..v).map(|c| 0.5 + (c % 3) as f32).collect())
                        .label_smoothing(0.1)
                        .gradient(true),
                    LossOptions::new()
                        .reduction(Reduction::None)
                        .softcap(5.0)
                        .z_loss(1e-3)
                        .gradient(true)
                        .lse(true),
                ] {
                    let what = format!("{format:?} {n}x{v} on {}", common::name(gpu));
                    let want = xent::cpu::reference::cross_entropy(&wide, v, &targets, &opts).unwrap();
                    let got = gpu.cross_entropy_half(&bits, format, v, &targets, &opts).unwrap();
                    compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
                    // The gradient in the logits' own format, into a buffer and in place.
                    let mut grad = vec![0u16; bits.len()];
                    let got =
                        gpu.cross_entropy_half_into(&bits, format, v, &targets, &opts, &mut grad).unwrap();
                    let want_grad = want.gradient.clone().unwrap();
                    compare(
                        &LossOutput { gradient: None, ..got },
                        &LossOutput { gradient: None, ..want.clone() },
                        Tolerance::F32,
                    )
                    .unwrap_or_else(|e| panic!("{what} into: {e}"));
                    within_type(&grad, &want_grad, format).unwrap_or_else(|e| panic!("{what} into: {e}"));
                    let mut in_place = bits.clone();
                    gpu.cross_entropy_half_in_place(&mut in_place, format, v, &targets, &opts).unwrap();
                    within_type(&in_place, &want_grad, format)
                        .unwrap_or_else(|e| panic!("{what} in place: {e}"));
                }
            }
            // The CPU paths agree too.
            let (bits, wide, targets) = case(9, 100, format, 3);
            let opts = LossOptions::new().gradient(true);
            let want = xent::cpu::reference::cross_entropy(&wide, 100, &targets, &opts).unwrap();
            for got in [
                xent::cpu::fast::cross_entropy_half(&bits, format, 100, &targets, &opts).unwrap(),
                xent::cpu::reference::cross_entropy_half(&bits, format, 100, &targets, &opts).unwrap(),
            ] {
                compare(&got, &want, Tolerance::F32).unwrap();
            }
        }
        // Odd V is refused with a clear message.
        let e =
            gpu.cross_entropy_half(&[0u16; 3], HalfFormat::F16, 3, &[0i64], &LossOptions::new()).unwrap_err();
        assert!(e.to_string().contains("even number of classes"), "{e}");
    }
}

#[test]
fn half_logits_stream_through_tiny_limits() {
    let Some(gpu) = common::tiny_device(common::gpus("half_logits_stream_through_tiny_limits")) else {
        return;
    };
    let (bits, wide, targets) = case(200, 1000, HalfFormat::Bf16, 11);
    let opts = LossOptions::new().gradient(true).row_losses(true);
    let want = xent::cpu::reference::cross_entropy(&wide, 1000, &targets, &opts).unwrap();
    let got = gpu.cross_entropy_half(&bits, HalfFormat::Bf16, 1000, &targets, &opts).unwrap();
    compare(&got, &want, Tolerance::F32).unwrap();
}
