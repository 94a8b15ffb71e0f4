//! The fast CPU path of the linear head (`CpuFast`) through the front door, against the
//! f64 reference (`Reference`) on the same inputs: every class-index option alone and
//! combined, the three reductions, `n_items`, ignored rows, all rows ignored, an empty
//! batch, with and without bias, f16/bf16 inputs (f32 and half destinations), the
//! backward from the saved LSE (scalar and per-row upstream), several row blocks, and
//! bit-identical repeat runs (also on 1 and 2 threads).
//!
//! # Tolerances
//!
//! Losses, row losses, LSE and the z-loss part: the f32 tolerances of the logits path
//! (`Tolerance::F32`: rtol 1e-5, atol 1e-6).
//!
//! Gradients `dh = G W`, `dW = Gᵀ h`, `db = Σ_rows G`: a bound derived per element, with
//! u = f32::EPSILON (2⁻²³, twice the unit roundoff, so every bound below is generous by 2):
//!
//! 1. Each logit is an f32 dot product of length D plus the bias: off by at most
//!    δx = (D + 2) u · max_{r,j} (Σ_k |h_rk W_jk| + |b_j|).
//! 2. That moves z = softcap(α x) by at most |α| δx, each p_j = exp(z_j − lse) by a
//!    relative 2 |α| δx, and the softcap's derivative α (1 − tanh²) by a relative
//!    2 |α| δx / c; the f32 row computations themselves (polynomial exp and tanh within
//!    4e-7, a handful of f32 roundings) add under 2e-6. So ρ = 2 |α| δx (1 + 1/c) + 2e-6.
//! 3. Every element of G is a sum of terms `f_r · dz_j · (p_j k_r − (ε/V) w_j −
//!    [j = y] (1 − ε) w_y)` with f_r = upstream / divisor and k_r = (1 − ε) w_y + ε W / V +
//!    2 s' lse. Its error is at most (ρ + 8 u) times the sum of the absolute values of its
//!    terms, t_rj (the 8 u: the roundings of a difference of such terms, where they
//!    cancel — the target's p_y − 1, the smoothing term); |G_rj| ≤ t_rj too.
//! 4. A product P = Σ_i G_i B_i of length L (V for dh, N for dW and db) in f32 adds at
//!    most L u Σ_i |G_i B_i| ≤ L u Σ_i t_i |B_i| (the GEMM's worst case), and the
//!    reference's own rounding to f32 u |P|.
//!
//! Hence `|got − want| ≤ (ρ + 8 u + ρ + L u) · Σ_i t_i |B_i| + u |want|` (B = W for dh,
//! h for dW, 1 for db), computed in the test from the f64 logits. Ignored rows have
//! t = 0: they must contribute exactly nothing. Half destinations add one rounding to
//! the half type on each side: 2⁻¹⁰ |want| (f16) or 2⁻⁷ |want| (bf16) more, plus the
//! smallest subnormal step.

mod common;

use common::head::{Head, head};
use xent::check::{Tolerance, compare};
use xent::{
    Backend, CpuFast, Gradient, GradientTo, HalfFormat, HeadGradients, LinearHead, LossOptions, LossOutput,
    Problem, Reduction, Reference, Upstream, Values,
};

const U: f64 = f32::EPSILON as f64;

/// Where the gradients go in one run.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Dest {
    /// No gradient: the loss only.
    Loss,
    /// Owned f32 gradients.
    Owned,
    /// Into f32 slices prefilled with NaN (they must be overwritten whole).
    IntoF32,
    /// Into half slices of the input's format.
    IntoHalf,
}

/// How one run is evaluated.
#[derive(Clone, Copy)]
enum Run<'a> {
    Fused,
    /// A backward from the saved LSE times the upstream gradient.
    Backward(&'a [f32], Upstream<'a>),
}

/// One run through the front door: the output and the gradients (dh, dW, db) as f32.
fn run(
    path: &dyn Backend,
    hd: &Head,
    half: Option<HalfFormat>,
    bias: bool,
    opts: &LossOptions,
    dest: Dest,
    mode: Run<'_>,
) -> (LossOutput, [Option<Vec<f32>>; 3]) {
    let bits = |x: &[f32]| -> Vec<u16> { x.iter().map(|&v| half.unwrap().from_f32(v)).collect() };
    let (hh, wh) = if half.is_some() { (bits(&hd.h), bits(&hd.w)) } else { (Vec::new(), Vec::new()) };
    let head = match half {
        Some(f) => LinearHead::new(Values::Half(&hh, f), Values::Half(&wh, f), hd.d),
        None => LinearHead::new(Values::F32(&hd.h), Values::F32(&hd.w), hd.d),
    };
    let head = if bias { head.bias(Values::F32(&hd.b)) } else { head };
    let (nd, vd, v) = (hd.n * hd.d, hd.v * hd.d, hd.v);
    let (mut dh, mut dw, mut db) = (vec![f32::NAN; nd], vec![f32::NAN; vd], vec![f32::NAN; v]);
    let (mut dhh, mut dwh, mut dbh) = (vec![0x7e00u16; nd], vec![0x7e00u16; vd], vec![0x7e00u16; v]);
    let problem = Problem::linear(head, &hd.t).lse(true).row_losses(true);
    let problem = match dest {
        Dest::Loss => problem,
        Dest::Owned => problem.gradient(Gradient::Linear(HeadGradients::owned())),
        Dest::IntoF32 => problem.gradient(Gradient::Linear(HeadGradients {
            hidden: GradientTo::IntoF32(&mut dh),
            weight: GradientTo::IntoF32(&mut dw),
            bias: if bias { GradientTo::IntoF32(&mut db) } else { GradientTo::Skip },
        })),
        Dest::IntoHalf => problem.gradient(Gradient::Linear(HeadGradients {
            hidden: GradientTo::IntoHalf(&mut dhh),
            weight: GradientTo::IntoHalf(&mut dwh),
            bias: if bias { GradientTo::IntoHalf(&mut dbh) } else { GradientTo::Skip },
        })),
    };
    let problem = match mode {
        Run::Fused => problem,
        Run::Backward(lse, upstream) => problem.backward(Some(lse), upstream),
    };
    let mut out = path.evaluate(problem, opts).unwrap_or_else(|e| panic!("{}: {e}", path.describe()));
    let widen = |b: &[u16]| -> Vec<f32> { b.iter().map(|&x| half.unwrap().to_f32(x)).collect() };
    let grads = match dest {
        Dest::Loss => [None, None, None],
        Dest::Owned => [out.grad_hidden.take(), out.grad_weight.take(), out.grad_bias.take()],
        Dest::IntoF32 => [Some(dh), Some(dw), bias.then_some(db)],
        Dest::IntoHalf => [Some(widen(&dhh)), Some(widen(&dwh)), bias.then(|| widen(&dbh))],
    };
    (out, grads)
}

/// The per-element bounds of the module's documentation for (dh, dW, db): t_rj from the
/// f64 logits, then Σ_i t_i |B_i| times (2ρ + 8u + L u).
fn bounds(hd: &Head, bias: bool, opts: &LossOptions, upstream: Upstream<'_>) -> [Vec<f64>; 3] {
    let (n, d, v) = (hd.n, hd.d, hd.v);
    let alpha = opts.get_logit_scale();
    let cap = opts.get_softcap();
    let eps = opts.get_label_smoothing();
    let s = opts.get_z_loss();
    let w = |c: usize| opts.get_weights().map_or(1.0, |w| f64::from(w[c]));
    let w_abs: f64 = (0..v).map(|c| w(c).abs()).sum();
    let ignore = opts.get_ignore_index();
    let counted: Vec<Option<usize>> = hd.t.iter().map(|&t| (t != ignore).then_some(t as usize)).collect();
    let (mut d_ce, mut d_z) = (0.0, 0.0);
    for y in counted.iter().flatten() {
        d_ce += w(*y);
        d_z += 1.0;
    }
    if let Some(k) = opts.get_n_items() {
        (d_ce, d_z) = (k, k);
    }
    let (divisor, s_grad) = match opts.get_reduction() {
        Reduction::Mean => (d_ce, if d_ce == d_z || d_z == 0.0 { s } else { s * d_ce / d_z }),
        _ => (1.0, s),
    };
    let scale = if divisor != 0.0 { 1.0 / divisor } else { 0.0 };
    let mut x = vec![0.0f64; n * v];
    let mut worst_dot = 0.0f64;
    for r in 0..n {
        for j in 0..v {
            let (hr, wj) = (&hd.h[r * d..(r + 1) * d], &hd.w[j * d..(j + 1) * d]);
            let dot: f64 = hr.iter().zip(wj).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            let abs: f64 = hr.iter().zip(wj).map(|(&a, &b)| (f64::from(a) * f64::from(b)).abs()).sum();
            let b = if bias { f64::from(hd.b[j]) } else { 0.0 };
            x[r * v + j] = dot + b;
            worst_dot = worst_dot.max(abs + b.abs());
        }
    }
    let dx = (d + 2) as f64 * U * worst_dot;
    let rho = 2.0 * alpha.abs() * dx * (1.0 + cap.map_or(0.0, |c| 1.0 / c)) + 2e-6;
    // t_rj, the absolute terms of each element of G.
    let mut t = vec![0.0f64; n * v];
    for r in 0..n {
        let Some(y) = counted[r] else { continue };
        let xs = &x[r * v..(r + 1) * v];
        let (z, dz): (Vec<f64>, Vec<f64>) = xs
            .iter()
            .map(|&x| match cap {
                Some(c) => {
                    let th = (alpha * x / c).tanh();
                    (c * th, alpha * (1.0 - th * th))
                }
                None => (alpha * x, alpha),
            })
            .unzip();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|z| (z - m).exp()).sum::<f64>().ln();
        let f = (scale * f64::from(upstream.of_row(r))).abs();
        let k = (1.0 - eps) * w(y).abs() + eps * w_abs / v as f64 + 2.0 * s_grad * (lse.abs() + 1.0);
        for j in 0..v {
            let p = (z[j] - lse).exp();
            let own = if j == y { (1.0 - eps) * w(y).abs() } else { 0.0 };
            t[r * v + j] = f * dz[j].abs() * (p * k + eps / v as f64 * w(j).abs() + own);
        }
    }
    let factor = |len: usize| 2.0 * rho + 8.0 * U + len as f64 * U;
    let (mut dh, mut dw, mut db) = (vec![0.0; n * d], vec![0.0; v * d], vec![0.0; v]);
    for r in 0..n {
        for j in 0..v {
            let tj = t[r * v + j];
            if tj == 0.0 {
                continue;
            }
            db[j] += tj;
            for k in 0..d {
                dh[r * d + k] += tj * f64::from(hd.w[j * d + k]).abs();
                dw[j * d + k] += tj * f64::from(hd.h[r * d + k]).abs();
            }
        }
    }
    dh.iter_mut().for_each(|b| *b *= factor(v));
    dw.iter_mut().for_each(|b| *b *= factor(n));
    db.iter_mut().for_each(|b| *b *= factor(n));
    [dh, dw, db]
}

/// Fast against the reference: loss, row losses, LSE and z-loss part under the f32
/// tolerances, the gradients under their bounds. Returns the worst gradient error as a
/// fraction of its bound.
#[allow(clippy::too_many_arguments)]
fn check(
    what: &str,
    hd: &Head,
    half: Option<HalfFormat>,
    bias: bool,
    opts: &LossOptions,
    dest: Dest,
    mode: Run<'_>,
) -> f64 {
    let (got, got_g) = run(&CpuFast, hd, half, bias, opts, dest, mode);
    let (want, want_g) = run(&Reference, hd, half, bias, opts, dest, mode);
    compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(got.row_losses.is_some(), want.row_losses.is_some(), "{what}: row losses");
    assert_eq!(got.lse.is_some(), want.lse.is_some(), "{what}: lse");
    match (got.z_loss, want.z_loss) {
        (Some(g), Some(w)) => {
            let (g, w) = (f64::from(g), f64::from(w));
            let tol = Tolerance::F32.loss_rtol * w.abs() + Tolerance::F32.loss_atol;
            assert!((g - w).abs() <= tol || (g.is_nan() && w.is_nan()), "{what}: z-loss {g} vs {w}");
        }
        (None, None) => {}
        (g, w) => panic!("{what}: z-loss {g:?} vs {w:?}"),
    }
    let upstream = match mode {
        Run::Fused => Upstream::Scalar(1.0),
        Run::Backward(_, up) => up,
    };
    let wide = half.map(|f| hd.rounded(f));
    let bounds = bounds(wide.as_ref().unwrap_or(hd), bias, opts, upstream);
    let rel_half = match (dest, half) {
        (Dest::IntoHalf, Some(HalfFormat::F16)) => 2f64.powi(-10),
        (Dest::IntoHalf, Some(HalfFormat::Bf16)) => 2f64.powi(-7),
        _ => 0.0,
    };
    let abs_half = if rel_half > 0.0 { 2f64.powi(-24) } else { 0.0 };
    let mut worst = 0.0f64;
    for (i, name) in ["dh", "dW", "db"].into_iter().enumerate() {
        match (&got_g[i], &want_g[i]) {
            (Some(g), Some(w)) => {
                assert_eq!(g.len(), w.len(), "{what}: {name} length");
                for (e, ((&a, &b), &bound)) in g.iter().zip(w).zip(&bounds[i]).enumerate() {
                    let (a, b) = (f64::from(a), f64::from(b));
                    let tol = bound + U * b.abs() + rel_half * b.abs() + abs_half;
                    let err = (a - b).abs();
                    assert!(
                        err <= tol,
                        "{what}: {name}[{e}] = {a}, want {b} (error {err:.3e}, bound {tol:.3e})"
                    );
                    if tol > 0.0 {
                        worst = worst.max(err / tol);
                    }
                }
            }
            (None, None) => {}
            (g, w) => panic!("{what}: {name} present {} vs {}", g.is_some(), w.is_some()),
        }
    }
    worst
}

fn weights(v: usize) -> Vec<f32> {
    (0..v).map(|c| 0.25 + (c % 7) as f32 * 0.25).collect()
}

/// 600 rows: three row blocks of the fast path (at most 256 rows each), V with a
/// remainder after the vector lanes.
fn big() -> Head {
    head(600, 24, 1003, 1)
}

#[test]
fn every_option_alone_and_combined_matches_the_reference() {
    let hd = big();
    let v = hd.v;
    let combined = || {
        LossOptions::new()
            .weights(weights(v))
            .label_smoothing(0.1)
            .ignore_index(5)
            .z_loss(1e-3)
            .softcap(5.0)
            .logit_scale(0.7)
    };
    let sets: Vec<(&str, LossOptions)> = vec![
        ("plain", LossOptions::new()),
        ("sum", LossOptions::new().reduction(Reduction::Sum)),
        ("none", LossOptions::new().reduction(Reduction::None)),
        ("weights", LossOptions::new().weights(weights(v))),
        ("smoothing", LossOptions::new().label_smoothing(0.1)),
        ("ignore_index", LossOptions::new().ignore_index(5)),
        ("z-loss", LossOptions::new().z_loss(1e-3)),
        ("softcap", LossOptions::new().softcap(5.0)),
        ("logit scale", LossOptions::new().logit_scale(0.7)),
        ("n_items", LossOptions::new().n_items(123.0)),
        ("combined mean", combined()),
        ("combined sum", combined().reduction(Reduction::Sum)),
        ("combined none", combined().reduction(Reduction::None)),
        ("combined n_items", combined().n_items(321.0)),
    ];
    // For ignore_index 5: the ignored rows marked 5 (as are, then, the rows of class 5).
    let hd5 = Head { t: hd.t.iter().map(|&t| if t == -100 { 5 } else { t }).collect(), ..big() };
    let mut worst = 0.0f64;
    for (name, opts) in &sets {
        let hd = if opts.get_ignore_index() == 5 { &hd5 } else { &hd };
        for bias in [true, false] {
            let dest = if bias { Dest::Owned } else { Dest::IntoF32 };
            let what = format!("{name} bias {bias}");
            worst = worst.max(check(&what, hd, None, bias, opts, dest, Run::Fused));
        }
        check(&format!("{name} loss only"), hd, None, true, opts, Dest::Loss, Run::Fused);
    }
    eprintln!("worst gradient error {worst:.3} of its bound");
}

#[test]
fn ignored_rows_and_degenerate_batches() {
    // Every row ignored: NaN under mean (0/0), 0 under sum, zero gradients.
    let mut hd = head(300, 8, 97, 2);
    hd.t.iter_mut().for_each(|t| *t = -100);
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let opts = LossOptions::new().reduction(reduction).z_loss(1e-3);
        check(&format!("all ignored {reduction:?}"), &hd, None, true, &opts, Dest::Owned, Run::Fused);
        let (out, g) = run(&CpuFast, &hd, None, true, &opts, Dest::IntoF32, Run::Fused);
        assert!(g.iter().flatten().flatten().all(|&x| x == 0.0), "all ignored: gradients 0");
        if reduction == Reduction::Mean {
            assert!(out.loss.unwrap().is_nan());
        }
    }
    // One row only, one class only.
    check("one row", &head(1, 5, 9, 3), None, true, &LossOptions::new(), Dest::Owned, Run::Fused);
    check("one class", &head(40, 5, 1, 4), None, true, &LossOptions::new(), Dest::Owned, Run::Fused);
    // An empty batch: as the reference (NaN mean, zero dW and db).
    let empty = Head { n: 0, h: Vec::new(), t: Vec::new(), ..head(1, 6, 11, 5) };
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let opts = LossOptions::new().reduction(reduction);
        let (got, got_g) = run(&CpuFast, &empty, None, true, &opts, Dest::IntoF32, Run::Fused);
        let (want, want_g) = run(&Reference, &empty, None, true, &opts, Dest::IntoF32, Run::Fused);
        assert_eq!(format!("{got:?}"), format!("{want:?}"), "empty {reduction:?}");
        assert_eq!(got_g, want_g);
        assert!(got_g[1].as_ref().unwrap().iter().all(|&x| x == 0.0));
    }
}

#[test]
fn half_inputs_into_f32_and_half_destinations() {
    let hd = head(300, 16, 515, 6);
    let opts = LossOptions::new().label_smoothing(0.05).z_loss(1e-4).softcap(8.0);
    for f in [HalfFormat::F16, HalfFormat::Bf16] {
        for dest in [Dest::Owned, Dest::IntoHalf, Dest::Loss] {
            check(&format!("{f:?} {dest:?}"), &hd, Some(f), true, &opts, dest, Run::Fused);
        }
        check(
            &format!("{f:?} no bias"),
            &hd,
            Some(f),
            false,
            &LossOptions::new(),
            Dest::IntoHalf,
            Run::Fused,
        );
    }
}

#[test]
fn backward_from_the_saved_lse() {
    let hd = big();
    let combined = LossOptions::new().weights(weights(hd.v)).label_smoothing(0.1).z_loss(1e-3).softcap(5.0);
    let per_row: Vec<f32> = (0..hd.n).map(|r| 0.5 + (r % 5) as f32 * 0.3).collect();
    for (name, opts, upstream) in [
        ("plain scalar", LossOptions::new(), Upstream::Scalar(0.7)),
        ("combined scalar", combined.clone(), Upstream::Scalar(1.3)),
        ("plain per row", LossOptions::new().reduction(Reduction::None), Upstream::PerRow(&per_row)),
        ("combined per row", combined.clone().reduction(Reduction::None), Upstream::PerRow(&per_row)),
    ] {
        let (fwd, _) = run(&Reference, &hd, None, true, &opts, Dest::Loss, Run::Fused);
        let lse = fwd.lse.unwrap();
        for dest in [Dest::IntoF32, Dest::Owned] {
            check(
                &format!("backward {name} {dest:?}"),
                &hd,
                None,
                true,
                &opts,
                dest,
                Run::Backward(&lse, upstream),
            );
        }
        // The fused gradient times a scalar upstream is the backward's, within the bounds.
        let (out, _) = run(&CpuFast, &hd, None, true, &opts, Dest::IntoF32, Run::Backward(&lse, upstream));
        assert_eq!((out.loss, out.row_losses, out.lse), (None, None, None), "a backward returns no loss");
    }
    let hb = head(200, 12, 300, 7);
    let opts = LossOptions::new().logit_scale(1.4);
    let (fwd, _) = run(&Reference, &hb, Some(HalfFormat::Bf16), true, &opts, Dest::Loss, Run::Fused);
    let lse = fwd.lse.unwrap();
    let up = Run::Backward(&lse, Upstream::Scalar(2.0));
    check("backward bf16 into half", &hb, Some(HalfFormat::Bf16), true, &opts, Dest::IntoHalf, up);
}

#[test]
fn repeat_runs_and_thread_counts_are_bit_identical() {
    let hd = big();
    let opts = LossOptions::new().weights(weights(hd.v)).label_smoothing(0.1).z_loss(1e-3).softcap(5.0);
    let once = || run(&CpuFast, &hd, None, true, &opts, Dest::Owned, Run::Fused);
    let first = once();
    assert_eq!(first, once(), "run to run");
    let pool = |k| rayon::ThreadPoolBuilder::new().num_threads(k).build().unwrap();
    assert_eq!(first, pool(1).install(once), "one thread");
    assert_eq!(first, pool(2).install(once), "two threads");
    assert_eq!(first, pool(3).install(once), "three threads");
}
