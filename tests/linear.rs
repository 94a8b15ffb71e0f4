//! The linear head through the front door: the f64 reference against the plain-logits
//! reference on logits formed in the test, hand-worked values, the input checks, and the
//! empty batch.

use xent::check::{Tolerance, compare};
use xent::{
    Backend, Error, Gradient, GradientTo, HalfFormat, HeadGradients, LinearHead, Logits, LossOptions,
    LossOutput, Mode, Problem, Reduction, Reference, Upstream, Values,
};

/// A deterministic head: h [n, d], W [v, d], b [v], targets with every 7th row ignored
/// (-100) and the rest spread over the classes.
struct Head {
    n: usize,
    d: usize,
    v: usize,
    h: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    t: Vec<i64>,
}

fn head(n: usize, d: usize, v: usize, seed: u64) -> Head {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    let h = (0..n * d).map(|_| (u() * 1.5) as f32).collect();
    let w = (0..v * d).map(|_| (u() * 0.8) as f32).collect();
    let b = (0..v).map(|_| (u() * 0.5) as f32).collect();
    let t = (0..n).map(|r| if r % 7 == 3 { -100 } else { ((r * 31 + 5) % v) as i64 }).collect();
    Head { n, d, v, h, w, b, t }
}

impl Head {
    fn linear(&self, bias: bool) -> LinearHead<'_> {
        let head = LinearHead::new(Values::F32(&self.h), Values::F32(&self.w), self.d);
        if bias { head.bias(Values::F32(&self.b)) } else { head }
    }
    /// The logits in f64, rounded once to f32.
    fn logits(&self, bias: bool) -> Vec<f32> {
        let mut x = Vec::with_capacity(self.n * self.v);
        for r in 0..self.n {
            for j in 0..self.v {
                let dot: f64 = (0..self.d)
                    .map(|k| f64::from(self.h[r * self.d + k]) * f64::from(self.w[j * self.d + k]))
                    .sum();
                x.push((dot + if bias { f64::from(self.b[j]) } else { 0.0 }) as f32);
            }
        }
        x
    }
}

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
        let wide = Head {
            h: hh.iter().map(|&b| f.to_f32(b)).collect(),
            w: wh.iter().map(|&b| f.to_f32(b)).collect(),
            b: hd.b.clone(),
            t: hd.t.clone(),
            ..hd
        };
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
    let mut dh = vec![7.0f32; 12];
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
