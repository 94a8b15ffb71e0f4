//! The linear head through the front door: the f64 reference against the plain-logits
//! reference on logits formed in the test, hand-worked values, the input checks, and the
//! empty batch.

mod common;

use common::head::{Head, head};

use xent::check::{Tolerance, compare};
use xent::{
    Backend, Error, Gradient, GradientTo, HalfFormat, HeadGradients, LinearHead, Logits, LossOptions,
    LossOutput, Mode, Problem, Reduction, Reference, Upstream, Values,
};

/// `dh = G W`, `dW = Gᵀ h`, `db = Σ_rows G` in f64 from an f32 gradient of the logits,
/// with each value's tolerance when every element of G is within `g_atol`:
/// `g_atol · Σ |the other operand|` over the summed index.
fn products(hd: &Head, g: &[f32], g_atol: f64) -> [(Vec<f64>, Vec<f64>); 3] {
    let (n, d, v) = (hd.n, hd.d, hd.v);
    let (mut dh, mut dh_tol) = (vec![0.0; n * d], vec![0.0; n * d]);
    let (mut dw, mut dw_tol) = (vec![0.0; v * d], vec![0.0; v * d]);
    let (mut db, db_tol) = (vec![0.0; v], vec![g_atol * n as f64; v]);
    for r in 0..n {
        for j in 0..v {
            let gj = f64::from(g[r * v + j]);
            db[j] += gj;
            for k in 0..d {
                let (hk, wk) = (f64::from(hd.h[r * d + k]), f64::from(hd.w[j * d + k]));
                dh[r * d + k] += gj * wk;
                dh_tol[r * d + k] += g_atol * wk.abs();
                dw[j * d + k] += gj * hk;
                dw_tol[j * d + k] += g_atol * hk.abs();
            }
        }
    }
    [(dh, dh_tol), (dw, dw_tol), (db, db_tol)]
}

fn close(what: &str, got: &[f32], want: &(Vec<f64>, Vec<f64>)) {
    assert_eq!(got.len(), want.0.len(), "{what}: length");
    for (i, (&g, (&w, &tol))) in got.iter().zip(want.0.iter().zip(&want.1)).enumerate() {
        let err = (f64::from(g) - w).abs();
        assert!(err <= tol.max(1e-7), "{what}[{i}]: got {g}, want {w} (error {err:.3e} > {tol:.3e})");
    }
}

fn option_sets(v: usize) -> Vec<(&'static str, LossOptions)> {
    let weights: Vec<f32> = (0..v).map(|c| 0.5 + (c % 5) as f32 * 0.3).collect();
    vec![
        ("plain", LossOptions::new()),
        ("sum", LossOptions::new().reduction(Reduction::Sum)),
        ("none", LossOptions::new().reduction(Reduction::None)),
        ("weights+smoothing", LossOptions::new().weights(weights.clone()).label_smoothing(0.1)),
        ("z-loss+weights", LossOptions::new().weights(weights.clone()).z_loss(1e-3)),
        ("softcap+scale", LossOptions::new().softcap(3.0).logit_scale(0.7)),
        ("n_items", LossOptions::new().n_items(40.0).label_smoothing(0.2)),
        (
            "everything",
            LossOptions::new()
                .weights(weights)
                .label_smoothing(0.05)
                .z_loss(1e-4)
                .softcap(4.0)
                .logit_scale(1.3),
        ),
    ]
}

/// The reference's linear head equals the plain-logits reference on the logits formed in
/// f64 (rounded once to f32 for it), and its gradients equal the products of that
/// reference's gradient: every option set, with and without bias.
#[test]
fn reference_linear_head_matches_the_plain_reference_on_its_logits() {
    let hd = head(23, 9, 13, 1);
    for bias in [true, false] {
        let x = hd.logits(bias);
        for (name, opts) in option_sets(hd.v) {
            let mut g = vec![0.0f32; x.len()];
            let plain =
                Problem::new(Logits::F32(&x), hd.v, &hd.t).gradient(Gradient::IntoF32(&mut g)).lse(true);
            let want = Reference.evaluate(plain, &opts).unwrap();
            let problem = Problem::linear(hd.linear(bias), &hd.t).gradient(Gradient::Owned).lse(true);
            let got = Reference.evaluate(problem, &opts).unwrap();
            compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{name}, bias {bias}: {e}"));
            // The plain reference's gradient is within 1e-6 of the exact one.
            let [dh, dw, db] = products(&hd, &g, Tolerance::F32.grad_atol);
            close(&format!("{name} dh"), got.grad_hidden.as_ref().unwrap(), &dh);
            close(&format!("{name} dW"), got.grad_weight.as_ref().unwrap(), &dw);
            assert_eq!(got.grad_bias.is_some(), bias, "{name}: db owned only with a bias");
            if bias {
                close(&format!("{name} db"), got.grad_bias.as_ref().unwrap(), &db);
            }
            assert!(got.gradient.is_none(), "no gradient of the logits for a head");
        }
    }
}

/// Hand-worked: h = [1, 0], W = I₂ plus a row (−1, −1), target 0: logits (1, 0, −1),
/// loss = log(e + 1 + 1/e) − 1, dh = p W − W_0, db = p − e_0.
#[test]
fn reference_linear_head_hand_worked() {
    let (h, w) = ([1.0f32, 0.0], [1.0f32, 0.0, 0.0, 1.0, -1.0, -1.0]);
    let head = LinearHead::new(Values::F32(&h), Values::F32(&w), 2).bias(Values::F32(&[0.0f32; 3]));
    let out = Reference
        .evaluate(Problem::linear(head, &[0i64]).gradient(Gradient::Owned), &LossOptions::new())
        .unwrap();
    let e = std::f64::consts::E;
    let z = e + 1.0 + 1.0 / e;
    let p = [e / z, 1.0 / z, (1.0 / e) / z];
    assert!((f64::from(out.loss.unwrap()) - (z.ln() - 1.0)).abs() < 1e-6);
    let dh = [p[0] - p[2] - 1.0, p[1] - p[2]];
    let db = [p[0] - 1.0, p[1], p[2]];
    for (g, w) in out.grad_hidden.unwrap().iter().zip(dh) {
        assert!((f64::from(*g) - w).abs() < 1e-7, "dh {g} vs {w}");
    }
    for (g, w) in out.grad_bias.unwrap().iter().zip(db) {
        assert!((f64::from(*g) - w).abs() < 1e-7, "db {g} vs {w}");
    }
    // dW_j = (p_j − δ_j0) h = (p_j − δ_j0, 0).
    let dw = out.grad_weight.unwrap();
    assert!(
        (f64::from(dw[0]) - (p[0] - 1.0)).abs() < 1e-7
            && dw[1] == 0.0
            && (f64::from(dw[4]) - p[2]).abs() < 1e-7
    );
}

/// A backward from the saved LSE times a per-row upstream gradient equals the fused
/// gradient of `none` scaled row by row.
#[test]
fn reference_linear_backward_from_saved_lse() {
    let hd = head(17, 5, 11, 2);
    let opts = LossOptions::new().reduction(Reduction::None).label_smoothing(0.1).z_loss(1e-3);
    let fused = Reference.evaluate(Problem::linear(hd.linear(true), &hd.t).lse(true), &opts).unwrap();
    let lse = fused.lse.unwrap();
    let up: Vec<f32> = (0..hd.n).map(|r| 0.5 + r as f32 * 0.1).collect();
    let mut dh = vec![0.0f32; hd.n * hd.d];
    let grads = HeadGradients { hidden: GradientTo::IntoF32(&mut dh), ..Default::default() };
    let problem = Problem::linear(hd.linear(true), &hd.t)
        .gradient(Gradient::Linear(grads))
        .backward(Some(&lse), Upstream::PerRow(&up));
    assert!(matches!(problem.mode, Mode::Backward { .. }));
    let out = Reference.evaluate(problem, &opts).unwrap();
    assert!(out.loss.is_none() && out.grad_hidden.is_none());
    // The fused per-row gradient of `none`, scaled by the upstream, through the products.
    let x = hd.logits(true);
    let mut g = vec![0.0f32; x.len()];
    Reference
        .evaluate(Problem::new(Logits::F32(&x), hd.v, &hd.t).gradient(Gradient::IntoF32(&mut g)), &opts)
        .unwrap();
    for r in 0..hd.n {
        g[r * hd.v..(r + 1) * hd.v].iter_mut().for_each(|x| *x *= up[r]);
    }
    // Scaled by up ≤ 2.1: G within 2.1e-6; the saved f32 LSE adds |p|·ulp(lse) ≈ 1e-7·|G|.
    let [want_dh, ..] = products(&hd, &g, 2.2e-6);
    close("dh", &dh, &want_dh);
}

/// Half inputs: the reference widens h, W exactly; IntoHalf rounds once.
#[test]
fn reference_linear_head_half_inputs() {
    let hd = head(9, 6, 7, 3);
    for f in [HalfFormat::F16, HalfFormat::Bf16] {
        let hh: Vec<u16> = hd.h.iter().map(|&x| f.from_f32(x)).collect();
        let wh: Vec<u16> = hd.w.iter().map(|&x| f.from_f32(x)).collect();
        let wide = hd.rounded(f);
        let opts = LossOptions::new().label_smoothing(0.1);
        let want = Reference
            .evaluate(Problem::linear(wide.linear(true), &wide.t).gradient(Gradient::Owned), &opts)
            .unwrap();
        let mut dw = vec![0u16; wh.len()];
        let head = LinearHead::new(Values::Half(&hh, f), Values::Half(&wh, f), hd.d).bias(Values::F32(&hd.b));
        let grads = HeadGradients { weight: GradientTo::IntoHalf(&mut dw), ..Default::default() };
        let got = Reference
            .evaluate(Problem::linear(head, &wide.t).gradient(Gradient::Linear(grads)), &opts)
            .unwrap();
        assert_eq!(got.loss, want.loss, "{f:?}: the same widened values");
        for (g, w) in dw.iter().zip(want.grad_weight.as_ref().unwrap()) {
            assert_eq!(*g, f.from_f32(*w), "{f:?}: dW rounded once");
        }
    }
}

/// Shapes that disagree are typed errors naming both sizes; nothing is written.
#[test]
fn linear_head_input_errors() {
    let hd = head(4, 3, 5, 4);
    let mut dh = [7.0f32; 12];
    let short_w = &hd.w[..14];
    let probs = vec![0.2f32; 20];
    let cases: Vec<(&str, Problem<'_>)> = vec![
        (
            "weight not a multiple of D",
            Problem::new(
                Logits::Linear(LinearHead::new(Values::F32(&hd.h), Values::F32(short_w), 3)),
                5,
                &hd.t,
            ),
        ),
        ("hidden vs targets", Problem::linear(hd.linear(false), &hd.t[..3])),
        ("bias vs classes", Problem::linear(hd.linear(false).bias(Values::F32(&hd.b[..4])), &hd.t)),
        (
            "dh length",
            Problem::linear(hd.linear(false), &hd.t).gradient(Gradient::Linear(HeadGradients {
                hidden: GradientTo::IntoF32(&mut dh[..11]),
                ..Default::default()
            })),
        ),
        ("probability targets", {
            let mut p = Problem::linear(hd.linear(false), &hd.t);
            p.labels = xent::Labels::Probabilities(&probs);
            p
        }),
        ("gradient over logits", Problem::linear(hd.linear(false), &hd.t).gradient(Gradient::InPlace)),
    ];
    for (what, problem) in cases {
        let err = Reference.evaluate(problem, &LossOptions::new()).unwrap_err();
        assert!(matches!(err, Error::Shape { .. } | Error::InvalidOption(_)), "{what}: {err}");
        eprintln!("{what}: {err}");
    }
    assert!(dh.iter().all(|&x| x == 7.0), "nothing written");
    let bad_target = [0i64, 9, 1, 2];
    let err =
        Reference.evaluate(Problem::linear(hd.linear(false), &bad_target), &LossOptions::new()).unwrap_err();
    assert!(matches!(err, Error::TargetOutOfRange { row: 1, value: 9, .. }), "{err}");
}

/// An empty batch: NaN mean, zero dW and db.
#[test]
fn linear_head_empty_batch() {
    let w = [1.0f32; 6];
    let mut dw = vec![5.0f32; 6];
    let head = LinearHead::new(Values::F32(&[]), Values::F32(&w), 2);
    let grads = HeadGradients { weight: GradientTo::IntoF32(&mut dw), ..Default::default() };
    let out: LossOutput = Reference
        .evaluate(Problem::linear(head, &[] as &[i64]).gradient(Gradient::Linear(grads)), &LossOptions::new())
        .unwrap();
    assert!(out.loss.unwrap().is_nan());
    assert!(dw.iter().all(|&x| x == 0.0));
}

/// The paths under test: the reference, the fast CPU path, every adapter.
fn paths() -> Vec<&'static dyn Backend> {
    static CPU: xent::CpuFast = xent::CpuFast;
    let mut all: Vec<&'static dyn Backend> = vec![&Reference, &CPU];
    all.extend(common::gpus("every_linear_cell_on_every_path").iter().map(|g| g as &dyn Backend));
    all
}

/// One run of a linear cell: the loss output and the three gradients as f32.
fn run_cell(
    path: &dyn Backend,
    cell: xent::Cell,
    hd: &Head,
    opts: &LossOptions,
    lse: Option<&[f32]>,
) -> xent::Result<(LossOutput, [Option<Vec<f32>>; 3])> {
    use xent::{Dtype, Output};
    let f = cell.dtype.half();
    let bits = |x: &[f32]| -> Vec<u16> { x.iter().map(|&v| f.unwrap().from_f32(v)).collect() };
    let (hh, wh) = match f {
        Some(_) => (bits(&hd.h), bits(&hd.w)),
        None => (Vec::new(), Vec::new()),
    };
    let head = match f {
        Some(f) => LinearHead::new(Values::Half(&hh, f), Values::Half(&wh, f), hd.d),
        None => LinearHead::new(Values::F32(&hd.h), Values::F32(&hd.w), hd.d),
    }
    .bias(Values::F32(&hd.b));
    let (n, v, d) = (hd.n * hd.d, hd.v * hd.d, hd.v);
    let (mut dh, mut dw, mut db) = (vec![0.0f32; n], vec![0.0f32; v], vec![0.0f32; d]);
    let (mut dhh, mut dwh, mut dbh) = (vec![0u16; n], vec![0u16; v], vec![0u16; d]);
    let problem = Problem::linear(head, &hd.t).lse(true).row_losses(true);
    let problem = match cell.output {
        Output::Loss => problem,
        Output::Owned => problem.gradient(Gradient::Owned),
        Output::IntoF32 | Output::Backward => problem.gradient(Gradient::Linear(HeadGradients {
            hidden: GradientTo::IntoF32(&mut dh),
            weight: GradientTo::IntoF32(&mut dw),
            bias: GradientTo::IntoF32(&mut db),
        })),
        Output::IntoHalf => problem.gradient(Gradient::Linear(HeadGradients {
            hidden: GradientTo::IntoHalf(&mut dhh),
            weight: GradientTo::IntoHalf(&mut dwh),
            bias: GradientTo::IntoHalf(&mut dbh),
        })),
        Output::InPlace => unreachable!("no in-place cell for a head"),
    };
    let problem = match cell.output {
        Output::Backward => problem.backward(lse, Upstream::Scalar(0.7)),
        _ => problem,
    };
    let mut out = path.evaluate(problem, opts)?;
    let widen = |b: &[u16]| -> Vec<f32> { b.iter().map(|&x| f.unwrap().to_f32(x)).collect() };
    let grads = match cell.output {
        Output::Loss => [None, None, None],
        Output::Owned => [out.grad_hidden.take(), out.grad_weight.take(), out.grad_bias.take()],
        Output::IntoF32 | Output::Backward => [Some(dh), Some(dw), Some(db)],
        _ => [Some(widen(&dhh)), Some(widen(&dwh)), Some(widen(&dbh))],
    };
    let _ = Dtype::F32;
    Ok((out, grads))
}

/// Every cell of the linear head (`Cell::linear()`) on every path against the f64
/// reference on the same (widened) inputs, under three option sets.
///
/// Tolerances. The paths form the logits by f32 products of length D, so each logit may be
/// off by γ_D Σ_k |h_k W_jk| (γ_D = D u / (1 − D u), u = 2⁻²⁴) whatever the order of the
/// sums; a logit error δ moves a row's loss by at most α·w_max·(1 + ε)·2δ and each element of
/// G = ∂loss/∂x by at most 2 α² w_max δ / divisor (α the logit scale, softcap derivative ≤ α).
/// The products dh = G W (length V), dW = Gᵀ h, db (length N) then add their own f32
/// rounding γ_L Σ |G| |other|. So each gradient element is allowed
/// (c_G + γ_L G_max) Σ |other operand| with c_G = 2e-6 (the f32 gradient tolerance of the
/// reference's G, twice: the paths' and the f64 rounding) + the logit term above. A
/// half destination adds the half ulp of the value (rounded once).
#[test]
fn every_linear_cell_on_every_path() {
    let hd = head(37, 16, 29, 7);
    let u = f64::from(f32::EPSILON) / 2.0;
    let gamma = |l: usize| l as f64 * u / (1.0 - l as f64 * u);
    let x_abs_max = (0..hd.n)
        .flat_map(|r| (0..hd.v).map(move |j| (r, j)))
        .map(|(r, j)| {
            (0..hd.d).map(|k| f64::from((hd.h[r * hd.d + k] * hd.w[j * hd.d + k]).abs())).sum::<f64>()
        })
        .fold(0.0, f64::max);
    let delta = gamma(hd.d) * x_abs_max + u * 20.0;
    let weights: Vec<f32> = (0..hd.v).map(|c| 0.5 + (c % 4) as f32 * 0.4).collect();
    let sets = [
        ("plain mean", LossOptions::new(), 1.0, 1.0),
        (
            "everything sum",
            LossOptions::new()
                .reduction(Reduction::Sum)
                .weights(weights.clone())
                .label_smoothing(0.1)
                .z_loss(1e-3)
                .softcap(5.0)
                .logit_scale(1.2),
            1.2,
            1.7,
        ),
        ("none + n_items", LossOptions::new().reduction(Reduction::None).n_items(50.0), 1.0, 1.0),
    ];
    for path in paths() {
        for cell in xent::Cell::linear() {
            for (name, opts, alpha, w_max) in &sets {
                let what = format!("{} / {cell} / {name}", path.describe());
                let widened = match cell.dtype.half() {
                    Some(f) => hd.rounded(f),
                    None => Head { h: hd.h.clone(), w: hd.w.clone(), b: hd.b.clone(), t: hd.t.clone(), ..hd },
                };
                let output =
                    if cell.output == xent::Output::IntoHalf { xent::Output::IntoF32 } else { cell.output };
                let exact = xent::Cell { dtype: xent::Dtype::F32, output, ..cell };
                let want_fused = run_cell(
                    &Reference,
                    xent::Cell { output: xent::Output::IntoF32, ..exact },
                    &widened,
                    opts,
                    None,
                )
                .unwrap();
                let lse = want_fused.0.lse.clone().unwrap();
                let (want, want_g) = run_cell(&Reference, exact, &widened, opts, Some(&lse)).unwrap();
                let (got, got_g) =
                    run_cell(path, cell, &hd, opts, Some(&lse)).unwrap_or_else(|e| panic!("{what}: {e}"));
                let divisor = match opts.get_reduction() {
                    Reduction::Mean => 30.0f64.min(opts.get_n_items().unwrap_or(30.0)),
                    _ => 1.0,
                };
                let loss_atol = 1e-6
                    + alpha
                        * w_max
                        * 1.1
                        * 2.0
                        * delta
                        * if opts.get_reduction() == Reduction::Sum { hd.n as f64 } else { 1.0 };
                let tol = Tolerance { loss_atol, ..Tolerance::F32 };
                compare(&got, &want, tol).unwrap_or_else(|e| panic!("{what}: {e}"));
                // G within c_G of the reference's; products of length L add γ_L G_max.
                let up = if cell.output == xent::Output::Backward { 0.7 } else { 1.0 };
                let g_max = up * alpha * w_max * 2.0 / divisor;
                let c_g = 2e-6 + 2.0 * alpha * alpha * w_max * delta / divisor * up;
                let half_ulp = match cell.dtype {
                    xent::Dtype::F16 => 2f64.powi(-11),
                    xent::Dtype::Bf16 => 2f64.powi(-8),
                    _ => 0.0,
                };
                for (i, (g, w)) in got_g.iter().zip(&want_g).enumerate() {
                    let (Some(g), Some(w)) = (g, w) else {
                        assert!(g.is_none() && w.is_none(), "{what}: gradient {i} present on one side");
                        continue;
                    };
                    let (len, other): (usize, &dyn Fn(usize) -> f64) = match i {
                        0 => (hd.v, &|e: usize| {
                            (0..hd.v).map(|j| f64::from(widened.w[j * hd.d + e % hd.d].abs())).sum()
                        }),
                        1 => (hd.n, &|e: usize| {
                            (0..hd.n).map(|r| f64::from(widened.h[r * hd.d + e % hd.d].abs())).sum()
                        }),
                        _ => (hd.n, &|_| hd.n as f64),
                    };
                    for (e, (&a, &b)) in g.iter().zip(w).enumerate() {
                        let tol = (c_g + gamma(len) * g_max) * other(e) + half_ulp * f64::from(b.abs());
                        let err = f64::from(a - b).abs();
                        assert!(
                            err <= tol,
                            "{what}: gradient {i}[{e}] got {a}, want {b} (error {err:.3e} > {tol:.3e})"
                        );
                    }
                }
            }
        }
    }
}
