//! The linear head's shared fixture: a deterministic head h, W, b and targets.

use xent::{HalfFormat, LinearHead, LossOptions, LossOutput, Reduction, Values};

/// A deterministic head: h [n, d], W [v, d], b [v], targets with every 7th row ignored
/// (-100) and the rest spread over the classes.
pub struct Head {
    pub n: usize,
    pub d: usize,
    pub v: usize,
    pub h: Vec<f32>,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub t: Vec<i64>,
}

pub fn head(n: usize, d: usize, v: usize, seed: u64) -> Head {
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
    pub fn linear(&self, bias: bool) -> LinearHead<'_> {
        let head = LinearHead::new(Values::F32(&self.h), Values::F32(&self.w), self.d);
        if bias { head.bias(Values::F32(&self.b)) } else { head }
    }
    /// The logits in f64, rounded once to f32.
    pub fn logits(&self, bias: bool) -> Vec<f32> {
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
    /// The same head with h and W rounded to a half format (and kept as f32, exactly the
    /// values the paths widen).
    pub fn rounded(&self, f: HalfFormat) -> Head {
        let r = |x: &[f32]| x.iter().map(|&x| f.to_f32(f.from_f32(x))).collect();
        Head { h: r(&self.h), w: r(&self.w), b: self.b.clone(), t: self.t.clone(), ..*self }
    }
}

/// The unit roundoff of f32.
pub const U: f64 = 1.0 / (1u64 << 24) as f64;

pub fn max_abs(x: &[f32]) -> f64 {
    x.iter().fold(0.0f64, |m, &v| m.max(f64::from(v).abs()))
}

/// ε_x of tests/linear_gpu.rs's documentation: how far f32 logits `Σ_k h_k W_k + b`
/// (D + 1 terms in a fixed order) may be from exact.
pub fn eps_x(hd: &Head, bias: bool) -> f64 {
    let b = if bias { max_abs(&hd.b) } else { 0.0 };
    (hd.d as f64 + 1.0) * U * (hd.d as f64 * max_abs(&hd.h) * max_abs(&hd.w) + b)
}

/// The bounds of tests/linear_gpu.rs's documentation for one problem.
pub struct Bounds {
    pub eps_x: f64,
    pub kappa: f64,
    /// Largest row scale s_r.
    pub s_max: f64,
    /// Σ_r s_r.
    pub s_sum: f64,
}

/// The bounds of `hd` under `opts`, with κ (the options' bound on Σ_v |∂ℓ/∂z_v| and
/// dz/dx before class weights) and the upstream gradient; the `mean` denominator is the
/// batch's own (n_items, Σ w_y or the counted rows).
pub fn bounds(hd: &Head, bias: bool, opts: &LossOptions, kappa: f64, upstream: f64) -> Bounds {
    let ignore = opts.get_ignore_index();
    let counted_rows: Vec<i64> = hd.t.iter().copied().filter(|&t| t != ignore && t >= 0).collect();
    let counted = counted_rows.len() as f64;
    let wmax = opts.get_weights().map_or(1.0, |w| max_abs(w).max(1.0));
    let s = match opts.get_reduction() {
        Reduction::Mean => {
            let d = opts.get_n_items().unwrap_or_else(|| match opts.get_weights() {
                Some(w) => counted_rows.iter().map(|&t| f64::from(w[t as usize])).sum(),
                None => counted,
            });
            if d > 0.0 { 1.0 / d } else { 0.0 }
        }
        _ => 1.0,
    } * upstream;
    Bounds { eps_x: eps_x(hd, bias), kappa: kappa * wmax, s_max: s, s_sum: s * counted.max(1.0) }
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - f64::from(w)).abs();
        assert!(
            err <= tol + 1e-7 * f64::from(w).abs(),
            "{what}[{i}]: got {g}, want {w} (|Δ| {err:.3e} > {tol:.3e})"
        );
    }
}

/// The loss: rtol 1e-5 and atol 1e-6 as for plain logits, plus what the logits' own
/// error moves it by (κ·ε_x per row, times the rows' scales).
pub fn loss_close(what: &str, got: Option<f32>, want: Option<f32>, logits_tol: f64) {
    match (got, want) {
        (Some(g), Some(w)) if g.is_nan() && w.is_nan() => {}
        (Some(g), Some(w)) => {
            let err = (f64::from(g) - f64::from(w)).abs();
            assert!(err <= 1e-5 * f64::from(w).abs() + 1e-6 + logits_tol, "{what}: got {g}, want {w}");
        }
        (None, None) => {}
        _ => panic!("{what}: got {got:?}, want {want:?}"),
    }
}

/// `got` (a path's output, named `label`) against `want` on every output present in
/// both, within the bounds `b`.
pub fn check(label: &str, got: &LossOutput, want: &LossOutput, hd: &Head, b: &Bounds, what: &str) {
    let what = format!("{what} on {label}");
    let logits_tol = b.kappa * b.eps_x * b.s_sum;
    loss_close(&format!("{what}: loss"), got.loss, want.loss, logits_tol);
    loss_close(&format!("{what}: z_loss"), got.z_loss, want.z_loss, logits_tol);
    for (name, g, w) in [("row_losses", &got.row_losses, &want.row_losses), ("lse", &got.lse, &want.lse)] {
        match (g, w) {
            (Some(g), Some(w)) => {
                assert_eq!(g.len(), w.len());
                for (i, (&g, &w)) in g.iter().zip(w).enumerate() {
                    if g.is_nan() && w.is_nan() {
                        continue;
                    }
                    // Each row's loss and LSE move by at most κ·ε_x with the logits.
                    let tol = 1e-5 * f64::from(w).abs() + 1e-6 + b.kappa * b.eps_x;
                    assert!((f64::from(g) - f64::from(w)).abs() <= tol, "{what}: {name}[{i}] {g} vs {w}");
                }
            }
            (None, None) => {}
            _ => panic!("{what}: {name} present on one side only"),
        }
    }
    let g_err = |s: f64| s * b.kappa * (2.0 * b.eps_x + 8.0 * U);
    let (n, v) = (hd.n as f64, hd.v as f64);
    let pairs = [
        (
            "dh",
            &got.grad_hidden,
            &want.grad_hidden,
            max_abs(&hd.w) * (g_err(b.s_max) + b.s_max * b.kappa * v * U),
        ),
        (
            "dW",
            &got.grad_weight,
            &want.grad_weight,
            max_abs(&hd.h) * (g_err(b.s_sum) + b.s_sum * b.kappa * n * U),
        ),
        ("db", &got.grad_bias, &want.grad_bias, g_err(b.s_sum) + b.s_sum * b.kappa * n * U),
    ];
    for (name, g, w, tol) in pairs {
        match (g, w) {
            (Some(g), Some(w)) => close(&format!("{what}: {name}"), g, w, tol),
            (None, None) => {}
            _ => panic!("{what}: {name} present on one side only"),
        }
    }
}

/// κ of tests/linear_gpu.rs for any options: Σ_v |∂ℓ/∂z_v| ≤ 2 (times the class
/// weights, in `bounds`), plus the z-loss term 2·s·|lse| with |lse| ≤ max |z| + ln V,
/// all times the logit scale (dz/dx; a softcap only shrinks it).
pub fn kappa(hd: &Head, o: &LossOptions) -> f64 {
    let x_max = (hd.d as f64) * max_abs(&hd.h) * max_abs(&hd.w) + max_abs(&hd.b);
    let z_max = (x_max * o.get_logit_scale()).min(o.get_softcap().unwrap_or(f64::INFINITY));
    o.get_logit_scale() * (2.0 + 2.0 * o.get_z_loss() * (z_max + (hd.v.max(1) as f64).ln()))
}
