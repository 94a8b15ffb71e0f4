//! Half-precision logits (f16, bf16 as raw bits): the GPU reads them packed and computes
//! in f32, so with an f32 gradient it must match the f32 reference on the widened values
//! under the f32 tolerances; a gradient in the logits' format must be that f32 result
//! rounded once (PyTorch's tolerances for the type).

mod common;

use xent::check::{Tolerance, compare};
use xent::{
    Backend, CpuFast, Error, Gradient, HalfFormat, Labels, Logits, LossOptions, LossOutput, Problem,
    Reduction, Reference, synth,
};

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

/// The f64 reference on the widened values: the loss, the f32 gradient (owned), and
/// the LSE when `lse`.
fn reference(wide: &[f32], v: usize, targets: &[i64], opts: &LossOptions, lse: bool) -> LossOutput {
    let problem =
        Problem::new(Logits::F32(wide), v, Labels::from(targets)).gradient(Gradient::Owned).lse(lse);
    Reference.evaluate(problem, opts).unwrap()
}

/// Half-precision `bits` on `backend` in the three gradient destinations of half logits,
/// each checked against `want` (the reference on the widened values): an owned f32
/// gradient under the f32 tolerances; into a buffer of the logits' format and in place
/// over them, each rounded once (the type's tolerances).
#[allow(clippy::too_many_arguments)]
fn check_half(
    backend: &dyn Backend,
    bits: &[u16],
    format: HalfFormat,
    v: usize,
    targets: &[i64],
    opts: &LossOptions,
    lse: bool,
    want: &LossOutput,
    what: &str,
) {
    let problem =
        Problem::new(Logits::Half(bits, format), v, Labels::from(targets)).gradient(Gradient::Owned).lse(lse);
    let got = backend.evaluate(problem, opts).unwrap_or_else(|e| panic!("{what}: {e}"));
    compare(&got, want, Tolerance::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
    // The gradient in the logits' own format, into a buffer and in place.
    let mut grad = vec![0u16; bits.len()];
    let problem = Problem::new(Logits::Half(bits, format), v, Labels::from(targets))
        .gradient(Gradient::IntoHalf(&mut grad))
        .lse(lse);
    let got = backend.evaluate(problem, opts).unwrap_or_else(|e| panic!("{what} into: {e}"));
    let want_grad = want.gradient.clone().unwrap();
    compare(
        &LossOutput { gradient: None, ..got },
        &LossOutput { gradient: None, ..want.clone() },
        Tolerance::F32,
    )
    .unwrap_or_else(|e| panic!("{what} into: {e}"));
    within_type(&grad, &want_grad, format).unwrap_or_else(|e| panic!("{what} into: {e}"));
    let mut in_place = bits.to_vec();
    let problem = Problem::new(Logits::HalfMut(&mut in_place, format), v, Labels::from(targets))
        .gradient(Gradient::InPlace)
        .lse(lse);
    backend.evaluate(problem, opts).unwrap_or_else(|e| panic!("{what} in place: {e}"));
    within_type(&in_place, &want_grad, format).unwrap_or_else(|e| panic!("{what} in place: {e}"));
}

/// The option sets of the GPU test, each with whether the LSE is asked for too.
fn option_sets(v: usize) -> [(LossOptions, bool); 3] {
    [
        (LossOptions::new(), false),
        (
            LossOptions::new()
                .reduction(Reduction::Sum)
                .weights((0..v).map(|c| 0.5 + (c % 3) as f32).collect())
                .label_smoothing(0.1),
            false,
        ),
        (LossOptions::new().reduction(Reduction::None).softcap(5.0).z_loss(1e-3), true),
    ]
}

#[test]
fn half_logits_match_the_reference_on_every_gpu() {
    for gpu in common::gpus("half_logits_match_the_reference") {
        for format in [HalfFormat::F16, HalfFormat::Bf16] {
            for (n, v) in [(1usize, 2usize), (7, 30), (33, 1000), (3, 32000), (70, 258)] {
                let (bits, wide, targets) = case(n, v, format, 7 + v as u64);
                for (opts, lse) in option_sets(v) {
                    let what = format!("{format:?} {n}x{v} on {}", common::name(gpu));
                    let want = reference(&wide, v, &targets, &opts, lse);
                    check_half(gpu, &bits, format, v, &targets, &opts, lse, &want, &what);
                }
            }
            // The CPU paths agree too.
            let (bits, wide, targets) = case(9, 100, format, 3);
            let opts = LossOptions::new();
            let want = reference(&wide, 100, &targets, &opts, false);
            for backend in [&CpuFast as &dyn Backend, &Reference] {
                let problem = Problem::new(Logits::Half(&bits, format), 100, Labels::from(&targets))
                    .gradient(Gradient::Owned);
                let got = backend.evaluate(problem, &opts).unwrap();
                compare(&got, &want, Tolerance::F32).unwrap();
            }
        }
    }
}

#[test]
fn odd_numbers_of_half_classes_match_the_reference() {
    // An odd number of classes (once refused: two values per 32-bit word) now works on
    // every path and in every gradient destination, against the reference on the
    // widened values.
    let gpus = common::gpus("odd_numbers_of_half_classes");
    let backends =
        [&CpuFast as &dyn Backend, &Reference].into_iter().chain(gpus.iter().map(|g| g as &dyn Backend));
    for backend in backends {
        // The smallest: three zero logits, loss ln 3.
        let zeros = [0u16; 3];
        let out = backend
            .evaluate(
                Problem::new(Logits::Half(&zeros, HalfFormat::F16), 3, Labels::from(&[0i64])),
                &LossOptions::new(),
            )
            .unwrap();
        let want = reference(&[0.0; 3], 3, &[0], &LossOptions::new(), false);
        compare(&out, &LossOutput { gradient: None, ..want }, Tolerance::F32)
            .unwrap_or_else(|e| panic!("1x3 on {}: {e}", backend.describe()));
        for format in [HalfFormat::F16, HalfFormat::Bf16] {
            for (n, v) in [(1usize, 3usize), (7, 31), (70, 257), (3, 4099)] {
                let (bits, wide, targets) = case(n, v, format, 17 + v as u64);
                for (opts, lse) in option_sets(v) {
                    let what = format!("{format:?} {n}x{v} on {}", backend.describe());
                    let want = reference(&wide, v, &targets, &opts, lse);
                    check_half(backend, &bits, format, v, &targets, &opts, lse, &want, &what);
                }
            }
        }
    }
}

#[test]
fn what_half_gradients_still_refuse() {
    // A gradient in a half type needs half-precision logits, and one value per logit.
    let logits = [0.5f32, -1.0, 2.0, 0.0];
    let bits: Vec<u16> = logits.iter().map(|&x| HalfFormat::F16.from_f32(x)).collect();
    let targets = [1i64, 0];
    let gpus = common::gpus("what_half_gradients_still_refuse");
    let backends =
        [&CpuFast as &dyn Backend, &Reference].into_iter().chain(gpus.iter().map(|g| g as &dyn Backend));
    for backend in backends {
        let mut grad = [0u16; 4];
        let problem = Problem::new(Logits::F32(&logits), 2, Labels::from(&targets))
            .gradient(Gradient::IntoHalf(&mut grad));
        let e = backend.evaluate(problem, &LossOptions::new()).unwrap_err();
        assert!(matches!(e, Error::InvalidOption(_)), "{} f32 logits into half: {e}", backend.describe());
        let mut short = [0u16; 3];
        let problem = Problem::new(Logits::Half(&bits, HalfFormat::F16), 2, Labels::from(&targets))
            .gradient(Gradient::IntoHalf(&mut short));
        let e = backend.evaluate(problem, &LossOptions::new()).unwrap_err();
        assert!(
            matches!(e, Error::Shape { got: 3, expected: 4, .. }),
            "{} short half gradient: {e}",
            backend.describe()
        );
        let problem = Problem::new(Logits::Half(&bits, HalfFormat::F16), 2, Labels::from(&targets))
            .gradient(Gradient::InPlace);
        let e = backend.evaluate(problem, &LossOptions::new()).unwrap_err();
        assert!(
            matches!(e, Error::InvalidOption(_)),
            "{} in place over read-only logits: {e}",
            backend.describe()
        );
    }
}

#[test]
fn half_logits_stream_through_tiny_limits() {
    let Some(gpu) = common::tiny_device(common::gpus("half_logits_stream_through_tiny_limits")) else {
        return;
    };
    let (bits, wide, targets) = case(200, 1000, HalfFormat::Bf16, 11);
    let opts = LossOptions::new();
    let want = Reference
        .evaluate(
            Problem::new(Logits::F32(&wide), 1000, Labels::from(&targets))
                .gradient(Gradient::Owned)
                .row_losses(true),
            &opts,
        )
        .unwrap();
    let problem = Problem::new(Logits::Half(&bits, HalfFormat::Bf16), 1000, Labels::from(&targets))
        .gradient(Gradient::Owned)
        .row_losses(true);
    let got = gpu.evaluate(problem, &opts).unwrap();
    compare(&got, &want, Tolerance::F32).unwrap();
}
