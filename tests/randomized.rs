//! Randomised cases, GPU against the f64 reference on every adapter: at least 500 cases
//! a run over shapes, options and awkward values, from a fixed seed (`XENT_PROPTEST_SEED`
//! to vary it). A failure shrinks towards the smallest shape and plainest values. The
//! linear head too: random shapes, options and inputs on every path against the reference,
//! within tests/linear_gpu.rs's bounds.

mod common;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use xent::check::{Tolerance, compare};
use xent::synth::Rng;
use xent::{Backend, Gradient, Labels, Logits, LossOptions, Problem, Reduction};

#[derive(Clone, Debug)]
struct Case {
    rows: usize,
    classes: usize,
    /// 0 normal, 1 offset +1e4, 2 spread ×1000, 3 tiny (1e-30), 4 huge (1e30),
    /// 5 half the vocabulary masked with −inf, 6 a NaN/+inf/all −inf row, 7 constant rows,
    /// 8 peaked rows (×3: p near 1, gradients near the class weight under `sum`).
    style: u8,
    reduction: u8,
    /// 0 none, 1 separate, 2 in place.
    gradient: u8,
    /// ignore_index: −100 or a valid class id (class 0).
    ignore_class_zero: bool,
    ignored_share: u8,
    /// 0 plain; 1 class weights; 2 label smoothing (+ weights); 3 z-loss + softcap +
    /// logit scale; 4 n_items; 5 everything.
    options: u8,
    seed: u64,
}

impl Case {
    fn data(&self) -> (Vec<f32>, Vec<i64>) {
        let (n, v) = (self.rows, self.classes);
        let mut rng = Rng::new(self.seed);
        let mut targets: Vec<i64> = (0..n).map(|_| rng.below(v as u64) as i64).collect();
        let ignore = if self.ignore_class_zero { 0 } else { -100 };
        for t in targets.iter_mut() {
            if rng.below(8) < u64::from(self.ignored_share) {
                *t = ignore;
            }
        }
        let mut logits: Vec<f32> = (0..n * v).map(|_| (rng.normal() * 2.0) as f32).collect();
        match self.style {
            1 => logits.iter_mut().for_each(|x| *x += 1e4),
            2 => logits.iter_mut().for_each(|x| *x *= 1000.0),
            3 => logits.iter_mut().for_each(|x| *x *= 1e-30),
            4 => logits.iter_mut().for_each(|x| *x *= 1e30),
            5 => {
                for (r, row) in logits.chunks_mut(v).enumerate() {
                    for (c, x) in row.iter_mut().enumerate() {
                        if c as i64 != targets[r] && rng.below(2) == 0 {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                }
            }
            6 if n > 0 => {
                let r = rng.below(n as u64) as usize;
                let row = &mut logits[r * v..(r + 1) * v];
                match rng.below(3) {
                    0 => row[rng.below(v as u64) as usize] = f32::NAN,
                    1 => row[rng.below(v as u64) as usize] = f32::INFINITY,
                    _ => row.iter_mut().for_each(|x| *x = f32::NEG_INFINITY),
                }
            }
            7 => logits.iter_mut().for_each(|x| *x = 0.5),
            8 => logits.iter_mut().for_each(|x| *x *= 3.0),
            _ => {}
        }
        (logits, targets)
    }

    fn opts(&self) -> LossOptions {
        let reduction = [Reduction::Mean, Reduction::Sum, Reduction::None][self.reduction as usize];
        let mut rng = Rng::new(self.seed ^ 0xABCD);
        let weights: Vec<f32> = (0..self.classes).map(|_| (rng.uniform() * 2.0) as f32).collect();
        let base = match self.options {
            1 => LossOptions::new().weights(weights),
            2 => LossOptions::new().weights(weights).label_smoothing(rng.uniform()),
            3 => LossOptions::new()
                .z_loss(1e-3)
                .softcap(2.0 + 30.0 * rng.uniform())
                .logit_scale(0.5 + rng.uniform()),
            4 => LossOptions::new().n_items(1.0 + 100.0 * rng.uniform()),
            5 => LossOptions::new()
                .weights(weights)
                .label_smoothing(0.1)
                .z_loss(1e-4)
                .softcap(30.0)
                .logit_scale(1.1)
                .n_items(17.0),
            _ => LossOptions::new(),
        };
        base.reduction(reduction).ignore_index(if self.ignore_class_zero { 0 } else { -100 })
    }
}

fn cases() -> impl Strategy<Value = Case> {
    let classes = prop_oneof![
        4 => 1usize..40,
        3 => 40usize..700,
        1 => prop::sample::select(vec![1000usize, 3001, 4096, 8191, 8192, 9000, 20000]),
    ];
    (0usize..40, classes, 0u8..9, 0u8..3, 0u8..3, any::<bool>(), 0u8..4, 0u8..6, any::<u64>()).prop_map(
        |(rows, classes, style, reduction, gradient, ignore_class_zero, ignored_share, options, seed)| Case {
            rows: if classes >= 4096 { rows.min(6) } else { rows },
            classes,
            style,
            reduction,
            gradient,
            ignore_class_zero,
            ignored_share,
            // Peaked rows under a softcap or logit scale: the transformed logit rounds to
            // f32 with an error of ulp(|z|) (up to 1.9e-6 at softcap 30) that the f64
            // reference does not have, and p carries it as a relative error — the fast CPU
            // path and the GPU show the same 1.1e-6 on gradients near 2 there, a limit of
            // f32 transforms, not of the kernels. Peaked rows take the other options.
            options: if style == 8 && (options == 3 || options == 5) { 1 } else { options },
            seed,
        },
    )
}

fn run(backend: &dyn Backend, case: &Case) -> Result<(), TestCaseError> {
    let (logits, targets) = case.data();
    let opts = case.opts();
    // The loss, the row losses and the LSE always; the gradient separate (1) or in place (2).
    fn problem<'a>(logits: Logits<'a>, v: usize, targets: &'a [i64], gradient: Gradient<'a>) -> Problem<'a> {
        Problem::new(logits, v, Labels::from(targets)).gradient(gradient).row_losses(true).lse(true)
    }
    let v = case.classes;
    let owned = || if case.gradient == 0 { Gradient::None } else { Gradient::Owned };
    let want = xent::Reference.evaluate(problem(Logits::F32(&logits), v, &targets, owned()), &opts);
    let got = if case.gradient == 2 {
        let mut in_place = logits.clone();
        let got =
            backend.evaluate(problem(Logits::F32Mut(&mut in_place), v, &targets, Gradient::InPlace), &opts);
        got.map(|o| xent::LossOutput { gradient: Some(in_place), ..o })
    } else {
        backend.evaluate(problem(Logits::F32(&logits), v, &targets, owned()), &opts)
    };
    let (got, want) = (got.map_err(|e| TestCaseError::fail(e.to_string()))?, want.unwrap());
    compare(&got, &want, Tolerance::F32)
        .map_err(|e| TestCaseError::fail(format!("{}: {e}", backend.describe())))?;
    Ok(())
}

fn seed() -> u64 {
    std::env::var("XENT_PROPTEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5EED_0001)
}

#[test]
fn random_cases_match_the_reference_on_every_adapter() {
    let gpus = common::gpus("random_cases_match_the_reference");
    let config = Config {
        cases: 500,
        rng_seed: RngSeed::Fixed(seed()),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let ran = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&cases(), |case| {
            ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for gpu in gpus {
                run(gpu, &case)?;
            }
            run(&xent::CpuFast, &case)
        })
        .unwrap();
    let ran = ran.into_inner();
    assert!(ran >= 500, "only {ran} cases ran");
    eprintln!("{ran} random cases on {} adapters and the fast CPU path: no mismatch", gpus.len());
}

#[derive(Clone, Debug)]
struct HeadCase {
    rows: usize,
    dim: usize,
    classes: usize,
    bias: bool,
    /// 0 f32, 1 f16, 2 bf16 h and W.
    half: u8,
    reduction: u8,
    grads: bool,
    ignored_share: u8,
    /// As `Case::options`.
    options: u8,
    seed: u64,
}

fn head_cases() -> impl Strategy<Value = HeadCase> {
    let classes = prop_oneof![4 => 1usize..60, 2 => 60usize..400, 1 => prop::sample::select(vec![1000usize, 2049, 4096])];
    (
        0usize..30,
        1usize..40,
        classes,
        any::<bool>(),
        0u8..3,
        0u8..3,
        any::<bool>(),
        0u8..4,
        0u8..6,
        any::<u64>(),
    )
        .prop_map(|(rows, dim, classes, bias, half, reduction, grads, ignored_share, options, seed)| {
            HeadCase {
                rows: if classes >= 1000 { rows.min(5) } else { rows },
                dim,
                classes,
                bias,
                half,
                reduction,
                grads,
                ignored_share,
                options,
                seed,
            }
        })
}

fn run_head(backend: &dyn Backend, case: &HeadCase) -> Result<(), TestCaseError> {
    use common::head::{bounds, check, head, kappa};
    use xent::{HalfFormat, LinearHead, Values};
    let mut hd = head(case.rows, case.dim, case.classes, case.seed);
    let mut rng = Rng::new(case.seed ^ 0x1234);
    for t in hd.t.iter_mut() {
        *t = if rng.below(8) < u64::from(case.ignored_share) {
            -100
        } else {
            rng.below(case.classes as u64) as i64
        };
    }
    let format = [None, Some(HalfFormat::F16), Some(HalfFormat::Bf16)][case.half as usize];
    if let Some(f) = format {
        hd = hd.rounded(f);
    }
    let bits = |x: &[f32], f: HalfFormat| x.iter().map(|&v| f.from_f32(v)).collect::<Vec<u16>>();
    let (h16, w16) = format.map_or((vec![], vec![]), |f| (bits(&hd.h, f), bits(&hd.w, f)));
    let linear = || match format {
        Some(f) => LinearHead::new(Values::Half(&h16, f), Values::Half(&w16, f), hd.d),
        None => LinearHead::new(Values::F32(&hd.h), Values::F32(&hd.w), hd.d),
    };
    let head_of = || if case.bias { linear().bias(Values::F32(&hd.b)) } else { linear() };
    let plain = Case {
        rows: case.rows,
        classes: case.classes,
        style: 0,
        reduction: case.reduction,
        gradient: 0,
        ignore_class_zero: false,
        ignored_share: 0,
        options: case.options,
        seed: case.seed,
    };
    let opts = plain.opts();
    let problem = || {
        let p = Problem::linear(head_of(), &hd.t[..]).row_losses(true).lse(true);
        if case.grads { p.gradient(Gradient::Owned) } else { p }
    };
    let want = xent::Reference.evaluate(problem(), &opts).unwrap();
    let mut got = backend.evaluate(problem(), &opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
    if !case.bias {
        got.grad_bias = want.grad_bias.as_ref().and(got.grad_bias);
    }
    let b = bounds(&hd, case.bias, &opts, kappa(&hd, &opts), 1.0);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check(&backend.describe(), &got, &want, &hd, &b, "random head")
    }))
    .map_err(|e| {
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        TestCaseError::fail(msg)
    })
}

#[test]
fn random_linear_heads_match_the_reference_on_every_path() {
    let gpus = common::gpus("random_linear_heads_match_the_reference_on_every_path");
    let config = Config {
        cases: 150,
        rng_seed: RngSeed::Fixed(seed()),
        failure_persistence: None,
        ..Config::default()
    };
    let ran = std::sync::atomic::AtomicUsize::new(0);
    TestRunner::new(config)
        .run(&head_cases(), |case| {
            ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for gpu in gpus {
                run_head(gpu, &case)?;
            }
            run_head(&xent::CpuFast, &case)
        })
        .unwrap();
    let ran = ran.into_inner();
    assert!(ran >= 150, "only {ran} cases ran");
    eprintln!("{ran} random linear heads on {} adapters and the fast CPU path: no mismatch", gpus.len());
}
