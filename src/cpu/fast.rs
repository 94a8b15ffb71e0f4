//! The fast CPU path: fused, multi-threaded over rows (rayon), with an f32 polynomial
//! `exp` that the compiler vectorises (AVX-512 or AVX2+FMA when the CPU has them, picked
//! at run time).
//!
//! Per row: one read for the max and the sum together (an online softmax over blocks of
//! `BLOCK` elements: the block's max, one rescale of the running sum when it grows,
//! then `exp(x − max)` summed in f32 lanes and added to an f64 total, so long rows never
//! form one long f32 chain); and, for the gradient, one more read and one write. Same
//! options and results as [`crate::cpu::reference`].
//!
//! Options cost little on top: the plain loss keeps its own row loop; with options, each
//! block of a row is transformed (logit scale, softcap, and the softcap's derivative when
//! a gradient is asked) into a per-task row buffer in the same read that takes the
//! statistics, the label-smoothing sum is one more vectorised pass over that buffer, and
//! the gradient loop is monomorphised per option set (class weights or not, softcap or
//! not), so that every inner loop is branch-free and vectorises.

use rayon::prelude::*;

use crate::error::Result;
use crate::metrics::RowMetrics;
use crate::options::{Batch, LossOptions, LossOutput, Reduction, Targets, Upstream};

/// Elements per block of the online softmax (a whole number of SIMD vectors).
pub(super) const BLOCK: usize = 64;
/// Lanes the inner loops are written for (LLVM maps them to 2 AVX2 or 4 SSE registers).
const LANES: usize = 16;

/// `exp(x)` for f32 with a relative error of a few ULP: `2^n · p(r)` with `n =
/// round(x / ln 2)`, `r = x − n ln 2` in two parts, and a degree-6 polynomial. −inf
/// gives 0, large x gives +inf, NaN stays NaN. Written branch-free so that it vectorises.
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Clamp so that 2^n stays representable; the clamps also make -inf → 0, +inf → inf.
    let xc = x.clamp(-110.0, 88.8);
    // Round to the nearest integer with the 1.5·2^23 trick: the sum's low mantissa bits
    // then hold n as an integer, so no float-to-int conversion (which would not
    // vectorise with Rust's saturating `as`) is needed.
    const MAGIC: f32 = 12_582_912.0;
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (0.166_666_67 + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // 2^n in two factors so that n down to -126 - 23 stays exact (subnormal results).
    let n = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let a = n / 2;
    let b = n - a;
    let pow = |k: i32| f32::from_bits(((k + 127).clamp(0, 255) as u32) << 23);
    let y = p * pow(a) * pow(b);
    // NaN in, NaN out (the clamp above would have turned it into a number).
    if x.is_nan() { x } else { y }
}

/// `a · b + c`: one fused multiply-add in the copies of the kernels compiled with FMA
/// (`F`), else a product and a sum (a call to `fmaf` would not vectorise).
#[inline(always)]
fn mul_add<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F { a.mul_add(b, c) } else { a * b + c }
}

/// `exp(x)` for `x ≤ 0` (or NaN), the leaner twin of [`exp_f32`] for the option paths,
/// whose arguments `z − max` cannot be positive: the same polynomial, one power of two,
/// results below 2^−126 flushed to 0 (−inf gives 0, NaN stays NaN). Equal to [`exp_f32`]
/// wherever the result is a normal number.
#[inline(always)]
fn exp_neg<const F: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0;
    const P: [f32; 7] = [1.0, 1.0, 0.5, 0.166_666_67, 0.041_666_668, 0.008_333_334, 0.001_388_889];
    let fma = mul_add::<F>;
    // A comparison rather than `max`, so that NaN stays NaN (and then propagates).
    let xc = if x < -104.0 { -104.0 } else { x };
    let t = fma(xc, LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = fma(-n, LN2_LO, fma(-n, LN2_HI, xc));
    let p = fma(fma(fma(fma(fma(fma(P[6], r, P[5]), r, P[4]), r, P[3]), r, P[2]), r, P[1]), r, P[0]);
    let n = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    p * f32::from_bits((n.wrapping_add(127).max(0) as u32) << 23)
}

/// Sum of 16 lanes as a tree (vectorises; no sequential chain).
#[inline(always)]
fn tree_sum(mut a: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            a[i] += a[i + w];
        }
        w /= 2;
    }
    a[0]
}

/// tanh(u) and 1 − tanh²(u) from one `expm1`, branch-free so that it vectorises (about a
/// third of the work of tanh through `exp` and an odd series for small |u|, and as
/// accurate: tanh within 3.1 ULP, 1 − tanh² within 3.3e-7 relative, 1.1e-7 below
/// |u| = 0.5). With x = −2|u| (at least −87), n = round(x / ln 2), r = x − n ln 2 and
/// q(r) ≈ (eʳ − 1) / r (degree 5), e = 2ⁿ (1 + r q) = exp(x) and
/// E = 2ⁿ r q + (2ⁿ − 1) = expm1(x), which does not cancel near 0 (there n = 0 and
/// E = r q). Then tanh |u| = −E / (1 + e) and 1 − tanh² = 4 e / (1 + e)² (no
/// cancellation near |tanh| = 1 either; 1 − tanh² near 0). ±1 at ±inf (and 1 − tanh²
/// ≈ 7e-38), NaN for NaN.
#[inline(always)]
fn tanh_sech2<const F: bool>(u: f32) -> (f32, f32) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0;
    // Near-minimax for (eʳ − 1) / r on |r| ≤ ln 2 / 2 (relative error 1.1e-8).
    const Q: [f32; 6] = [1.0, 0.499_999_97, 0.166_665_06, 0.041_667_137, 0.008_369_104, 0.001_388_887_3];
    let fma = mul_add::<F>;
    let a = u.abs();
    let x = -2.0 * a;
    // A comparison rather than `max`, so that NaN stays NaN (and then propagates).
    let x = if x < -87.0 { -87.0 } else { x };
    let t = fma(x, LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = fma(-n, LN2_LO, fma(-n, LN2_HI, x));
    let q = fma(fma(fma(fma(fma(Q[5], r, Q[4]), r, Q[3]), r, Q[2]), r, Q[1]), r, Q[0]);
    let rq = r * q;
    // 2ⁿ for n in [−126, 0]: a normal number.
    let n = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let pow = f32::from_bits((n.wrapping_add(127) as u32) << 23);
    let e = fma(pow, rq, pow);
    let em1 = fma(pow, rq, pow - 1.0);
    let rd = 1.0 / (1.0 + e);
    let t = -em1 * rd;
    // 1 − tanh² as 1 − t² near 0, where 4 e r² would carry the roundings of e and r
    // (1.1e-7 against 2.6e-7 relative below |u| = 0.5).
    let sech2 = if a < 0.5 { 1.0 - t * t } else { 4.0 * e * rd * rd };
    (t.copysign(u), sech2)
}

/// Max of a slice in lanes (NaN-propagating where it matters is handled by the sum).
#[inline(always)]
fn block_max(xs: &[f32]) -> f32 {
    let mut m = [f32::MIN; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            m[i] = if c[i] > m[i] { c[i] } else { m[i] };
        }
    }
    let mut out = rest.iter().fold(f32::MIN, |a, &b| if b > a { b } else { a });
    for v in m {
        out = if v > out { v } else { out };
    }
    out
}

/// Σ exp(x − m) over a slice, in f32 lanes.
#[inline(always)]
fn block_sum_exp(xs: &[f32], m: f32) -> f32 {
    let mut s = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            s[i] += exp_f32(c[i] - m);
        }
    }
    rest.iter().map(|&x| exp_f32(x - m)).sum::<f32>() + s.iter().sum::<f32>()
}

/// (max, Σ exp(x − max)) of a row in one read: the online softmax over blocks.
#[inline(always)]
pub(super) fn row_stats(row: &[f32]) -> (f32, f64) {
    let mut m = crate::row_state::EMPTY_MAX;
    let mut total = 0.0f64;
    for block in row.chunks(BLOCK) {
        let bm = block_max(block);
        if bm > m {
            total *= f64::from(m - bm).exp();
            m = bm;
        }
        total += f64::from(block_sum_exp(block, m));
    }
    (m, total)
}

/// [`block_sum_exp`] with the metrics' parts in the same read: (Σ e, Σ e (x − m),
/// #{x > z_t}) with e = exp(x − m).
#[inline(always)]
fn block_sums_metrics(xs: &[f32], m: f32, z_t: f32) -> (f32, f32, u64) {
    // f32 lanes throughout (the count is exact: at most BLOCK per lane), so the loop
    // vectorises as one.
    let (mut s, mut sp, mut ab) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
    let mut one = |i: usize, x: f32| {
        let d = x - m;
        let e = exp_f32(d);
        s[i] += e;
        // A masked (−inf) class adds 0, not 0 · −inf.
        sp[i] += e * d.max(f32::MIN);
        ab[i] += if x > z_t { 1.0 } else { 0.0 };
    };
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (i, &x) in c.iter().enumerate() {
            one(i, x);
        }
    }
    for (i, &x) in rest.iter().enumerate() {
        one(i, x);
    }
    (s.iter().sum(), sp.iter().sum(), ab.iter().sum::<f32>() as u64)
}

/// [`row_stats`] with the metrics in the same read: a row's [`RowMetrics`] (against
/// `target`, −1 ignored) beside (max, Σ exp(x − max)). The spread Σ e (x − max) moves to
/// a new max as the sum does; the argmax is the first column holding the max (a scan
/// that stops there), −1 for a row holding a NaN.
#[inline(always)]
fn row_stats_metrics(row: &[f32], target: i64) -> (f32, f64, RowMetrics) {
    let z_t = if target >= 0 { row[target as usize] } else { f32::INFINITY };
    let OnlineMetrics { max: m, sum: total, spread, above, max_block } = online_metrics(row, z_t);
    let nan = total.is_nan() && row.iter().any(|x| x.is_nan());
    let first = max_block * BLOCK;
    let argmax = (!nan).then(|| row[first..].iter().position(|&x| x == m).map_or(0, |i| first + i));
    (m, total, RowMetrics::from_stats(target, argmax, above, m, total as f32, spread as f32, z_t))
}

/// A row's online softmax with the metrics' parts, in one read ([`online_metrics`]).
pub(super) struct OnlineMetrics {
    /// The row's max (NaN passed over).
    pub max: f32,
    /// Σ exp(x − max).
    pub sum: f64,
    /// Σ exp(x − max) (x − max).
    pub spread: f64,
    /// #{x > z_t}.
    pub above: u64,
    /// The first block of [`BLOCK`] columns holding the max: the argmax is found in it.
    pub max_block: usize,
}

/// The blocked online softmax of a row with the spread and the count above `z_t` beside
/// the sum: the spread moves to a new max as the sum does.
#[inline(always)]
pub(super) fn online_metrics(row: &[f32], z_t: f32) -> OnlineMetrics {
    let mut m = crate::row_state::EMPTY_MAX;
    let (mut total, mut spread, mut above, mut max_block) = (0.0f64, 0.0f64, 0u64, 0);
    for (b, block) in row.chunks(BLOCK).enumerate() {
        let bm = block_max(block);
        if bm > m {
            let d = f64::from(m) - f64::from(bm);
            let f = d.exp();
            spread = if total > 0.0 { f * (spread + total * d) } else { 0.0 };
            total *= f;
            m = bm;
            max_block = b;
        }
        let (s, sp, ab) = block_sums_metrics(block, m, z_t);
        total += f64::from(s);
        spread += f64::from(sp);
        above += ab;
    }
    OnlineMetrics { max: m, sum: total, spread, above, max_block }
}

/// Writes `(exp(x − m − log s) − onehot) · scale` for one row.
#[inline(always)]
fn row_grad(row: &[f32], out: &mut [f32], m: f32, log_s: f32, target: usize, scale: f32) {
    let (xs, os) = (row.chunks_exact(LANES), out.chunks_exact_mut(LANES));
    let done = xs.len() * LANES;
    for (x, o) in xs.zip(os) {
        for i in 0..LANES {
            // (x − m) − log s: exact subtraction first, as in the kernels.
            o[i] = exp_f32((x[i] - m) - log_s) * scale;
        }
    }
    for (x, o) in row[done..].iter().zip(&mut out[done..]) {
        *o = exp_f32((*x - m) - log_s) * scale;
    }
    // p − 1 for the target, computed from p before scaling, in f32.
    out[target] = (exp_f32((row[target] - m) - log_s) - 1.0) * scale;
}

/// Everything about one row without options: loss, LSE, its gradient if `out` is given,
/// and its metrics (in the same read) if `metrics` is.
#[inline(always)]
fn process_row(
    row: &[f32],
    target: i32,
    scale: f32,
    out: Option<&mut [f32]>,
    metrics: Option<&mut RowMetrics>,
) -> (f32, f32) {
    let (m, s) = match metrics {
        Some(slot) => {
            let (m, s, rm) = row_stats_metrics(row, i64::from(target));
            *slot = rm;
            (m, s)
        }
        None => row_stats(row),
    };
    let log_s = s.ln() as f32;
    let lse = m + log_s;
    if target == Batch::IGNORED {
        if let Some(o) = out {
            o.fill(0.0);
        }
        return (0.0, lse);
    }
    let t = target as usize;
    if let Some(o) = out {
        row_grad(row, o, m, log_s, t, scale);
    }
    ((m - row[t]) + log_s, lse)
}

/// The options of a call, in the form the row loops use.
struct RowOpts<'a> {
    /// Gradient scale: 1 / the `mean` denominator (or 1).
    scale: f32,
    /// No option changes the row computation (`n_items` only changes `scale`).
    plain: bool,
    eps: f32,
    /// z-loss scale s of the row losses.
    z_loss: f32,
    /// z-loss scale of the gradient: s times the cross-entropy divisor over the z-loss
    /// divisor, so that times `scale` the z part divides by the z-loss divisor.
    z_grad: f32,
    alpha: f32,
    cap: Option<f32>,
    /// α / c: the softcap's argument is `x · α / c`.
    alpha_over_cap: f32,
    weights: Option<&'a [f32]>,
    /// W = Σ_c w_c (V without weights).
    total_weight: f64,
}

impl<'a> RowOpts<'a> {
    fn new(opts: &'a LossOptions, classes: usize, scale: f32, z_grad: f64) -> Self {
        let weights = opts.get_weights();
        let alpha = opts.get_logit_scale() as f32;
        let cap = opts.get_softcap().map(|c| c as f32);
        let eps = opts.get_label_smoothing() as f32;
        let z_loss = opts.get_z_loss() as f32;
        Self {
            scale,
            plain: weights.is_none() && eps == 0.0 && z_loss == 0.0 && cap.is_none() && alpha == 1.0,
            eps,
            z_loss,
            z_grad: z_grad as f32,
            alpha,
            cap,
            alpha_over_cap: cap.map_or(1.0, |c| (opts.get_logit_scale() / f64::from(c)) as f32),
            weights,
            total_weight: weights.map_or(classes as f64, |w| w.iter().map(|&x| f64::from(x)).sum()),
        }
    }
    #[inline(always)]
    fn weight(&self, c: usize) -> f32 {
        self.weights.map_or(1.0, |w| w[c])
    }
    /// Whether the loss sees transformed logits (a logit scale or a softcap), held in
    /// [`Scratch::z`].
    fn transforms(&self) -> bool {
        self.cap.is_some() || self.alpha != 1.0
    }
}

/// Per-task row buffers of the option paths: the transformed logits `z` and, for a
/// gradient under a softcap, `dz/dx`.
struct Scratch {
    z: Vec<f32>,
    dz: Vec<f32>,
}

impl Scratch {
    /// For a fused call (`grad`: with the gradient, which then holds the transformed row
    /// itself) or, with `backward`, for the separate backward.
    fn new(v: usize, o: &RowOpts<'_>, grad: bool, backward: bool) -> Self {
        let z = if o.transforms() && (backward || !grad) { v } else { 0 };
        let dz = if o.cap.is_some() && grad { v } else { 0 };
        Self { z: vec![0.0; z], dz: vec![0.0; dz] }
    }
}

/// The logit transform of a row into `z`: `α x`, or `c · tanh(x α / c)` with the
/// softcap (and then, when `DZ`, `dz/dx = α (1 − tanh²)` into `dz`). Returns max z (NaN
/// left out, as in [`block_max`]; [`crate::row_state::EMPTY_MAX`] for an empty or fully
/// −inf row), kept in lanes.
#[inline(always)]
fn transform_max<const F: bool, const CAP: bool, const DZ: bool>(
    row: &[f32],
    z: &mut [f32],
    dz: &mut [f32],
    o: &RowOpts<'_>,
) -> f32 {
    let (alpha, ac, cap) = (o.alpha, o.alpha_over_cap, o.cap.unwrap_or(1.0));
    let one = |x: f32| -> (f32, f32) {
        if CAP {
            let (t, s2) = tanh_sech2::<F>(x * ac);
            (cap * t, alpha * s2)
        } else {
            (alpha * x, alpha)
        }
    };
    let mut mx = [crate::row_state::EMPTY_MAX; LANES];
    let n = row.len();
    let body = n - n % LANES;
    for (j, (xc, zc)) in row[..body].chunks_exact(LANES).zip(z[..body].chunks_exact_mut(LANES)).enumerate() {
        // Values in registers first: the max is taken from them, not read back from the
        // stores (which LLVM would do with overlapping loads that stall forwarding).
        let (mut zl, mut dl) = ([0.0f32; LANES], [0.0f32; LANES]);
        for i in 0..LANES {
            (zl[i], dl[i]) = one(xc[i]);
        }
        for i in 0..LANES {
            mx[i] = if zl[i] > mx[i] { zl[i] } else { mx[i] };
        }
        zc.copy_from_slice(&zl);
        if DZ {
            dz[j * LANES..j * LANES + LANES].copy_from_slice(&dl);
        }
    }
    for c in body..n {
        let (zc, dc) = one(row[c]);
        z[c] = zc;
        if DZ {
            dz[c] = dc;
        }
        mx[0] = if zc > mx[0] { zc } else { mx[0] };
    }
    mx.iter().fold(crate::row_state::EMPTY_MAX, |a, &b| if b > a { b } else { a })
}

/// What [`sums_at_max`] adds up besides Σ exp(z − m).
const X_NONE: u8 = 0;
/// Label smoothing: Σ_c w_c (m − z_c).
const X_SMOOTH: u8 = 1;
/// Probability targets `ts`, `t' = (1−ε) t + ε/V`: Σ_c w_c t'_c and
/// Σ_c w_c t'_c (m − z_c), the terms whose weight `w_c t'_c` is 0 left out (a −inf
/// logit with target 0 adds nothing).
const X_SOFT: u8 = 2;

/// The sums of a row whose max `m` is known: Σ_c e_c with e_c = exp(z_c − m), and what
/// `X` asks for (w = 1 unless `W`); f32 lanes within each block of `BLOCK`, each block's
/// lanes added as a tree into f64 totals. `STORE`: e_c is written into `g` (for the
/// gradient, which then needs no exp); `IN_G`: z is read from `g` (and `z` is empty).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn sums_at_max<const F: bool, const X: u8, const W: bool, const STORE: bool, const IN_G: bool>(
    z: &[f32],
    g: &mut [f32],
    w: &[f32],
    ts: &[f32],
    eps: f32,
    m: f32,
) -> (f64, f64, f64) {
    let n = if IN_G { g.len() } else { z.len() };
    let smooth = eps / n as f32;
    let (mut te, mut t1, mut t2) = (0.0f64, 0.0f64, 0.0f64);
    let mut b0 = 0;
    while b0 < n {
        let b1 = (b0 + BLOCK).min(n);
        let (mut se, mut s1, mut s2) = ([0.0f32; LANES], [0.0f32; LANES], [0.0f32; LANES]);
        let mut one = |i: usize, zi: f32, wi: f32, ti: f32| -> f32 {
            let e = exp_neg::<F>(zi - m);
            se[i] += e;
            if X == X_SMOOTH {
                let d = m - zi;
                s1[i] += if W { wi * d } else { d };
            } else if X == X_SOFT {
                let t = (1.0 - eps) * ti + smooth;
                let wt = if W { wi * t } else { t };
                s1[i] += wt;
                s2[i] += if wt != 0.0 { wt * (m - zi) } else { 0.0 };
            }
            e
        };
        let mut at = b0;
        while at + LANES <= b1 {
            let zc: [f32; LANES] =
                if IN_G { &g[at..at + LANES] } else { &z[at..at + LANES] }.try_into().unwrap();
            let wc: &[f32] = if W { &w[at..at + LANES] } else { &zc };
            let tc: &[f32] = if X == X_SOFT { &ts[at..at + LANES] } else { &zc };
            let mut ec = [0.0f32; LANES];
            for i in 0..LANES {
                ec[i] = one(i, zc[i], wc[i], tc[i]);
            }
            if STORE {
                g[at..at + LANES].copy_from_slice(&ec);
            }
            at += LANES;
        }
        for c in at..b1 {
            let zi = if IN_G { g[c] } else { z[c] };
            let e = one(c - at, zi, if W { w[c] } else { 1.0 }, if X == X_SOFT { ts[c] } else { 0.0 });
            if STORE {
                g[c] = e;
            }
        }
        te += f64::from(tree_sum(se));
        if X != X_NONE {
            t1 += f64::from(tree_sum(s1));
        }
        if X == X_SOFT {
            t2 += f64::from(tree_sum(s2));
        }
        b0 = b1;
    }
    (te, t1, t2)
}

/// [`sums_at_max`] for the options in force, reading z from `z` and storing nothing.
#[inline(always)]
fn sums_of<const F: bool>(z: &[f32], x: u8, o: &RowOpts<'_>, ts: &[f32], m: f32) -> (f64, f64, f64) {
    let (w, e) = (o.weights.unwrap_or(&[]), o.eps);
    match (x, o.weights.is_some()) {
        (X_SMOOTH, true) => sums_at_max::<F, X_SMOOTH, true, false, false>(z, &mut [], w, ts, e, m),
        (X_SMOOTH, false) => sums_at_max::<F, X_SMOOTH, false, false, false>(z, &mut [], w, ts, e, m),
        (X_SOFT, true) => sums_at_max::<F, X_SOFT, true, false, false>(z, &mut [], w, ts, e, m),
        (X_SOFT, false) => sums_at_max::<F, X_SOFT, false, false, false>(z, &mut [], w, ts, e, m),
        _ => sums_at_max::<F, X_NONE, false, false, false>(z, &mut [], w, ts, e, m),
    }
}

/// [`sums_at_max`] for the options in force, storing e into `g`: z read from `g` when
/// `in_g`, else from `row`.
#[inline(always)]
fn sums_into<const F: bool>(
    row: &[f32],
    g: &mut [f32],
    in_g: bool,
    x: u8,
    o: &RowOpts<'_>,
    ts: &[f32],
    m: f32,
) -> (f64, f64, f64) {
    let (w, e) = (o.weights.unwrap_or(&[]), o.eps);
    macro_rules! go {
        ($x:expr, $w:expr) => {
            if in_g {
                sums_at_max::<F, { $x }, { $w }, true, true>(&[], g, w, ts, e, m)
            } else {
                sums_at_max::<F, { $x }, { $w }, true, false>(row, g, w, ts, e, m)
            }
        };
    }
    match (x, o.weights.is_some()) {
        (X_SMOOTH, true) => go!(X_SMOOTH, true),
        (X_SMOOTH, false) => go!(X_SMOOTH, false),
        (X_SOFT, true) => go!(X_SOFT, true),
        (X_SOFT, false) => go!(X_SOFT, false),
        (_, true) => go!(X_NONE, true),
        (_, false) => go!(X_NONE, false),
    }
}

/// The statistics of a row under the options, for a loss without gradient: (max,
/// Σ exp(z − max), and when `smooth` the label-smoothing sum Σ_c w_c (max − z_c)). The
/// transformed row is then in `z` when [`RowOpts::transforms`] (else it is `row`
/// itself, whose statistics are then those of the plain loss).
#[inline(always)]
fn options_stats<const F: bool>(
    row: &[f32],
    o: &RowOpts<'_>,
    z: &mut [f32],
    smooth: bool,
) -> (f32, f64, f64) {
    if !o.transforms() {
        let (m, s) = row_stats(row);
        let sm = match (smooth, o.weights) {
            (false, _) => 0.0,
            (true, Some(w)) => smooth_sum::<true>(row, w, m),
            (true, None) => smooth_sum::<false>(row, &[], m),
        };
        return (m, s, sm);
    }
    let m = transform_into::<F>(row, z, &mut [], o);
    let (s, sm, _) = sums_of::<F>(z, if smooth { X_SMOOTH } else { X_NONE }, o, &[], m);
    (m, s, sm)
}

/// The transformed row into `z` (and its derivative into `dz` under a softcap, unless
/// `dz` is empty); returns its max.
#[inline(always)]
fn transform_into<const F: bool>(row: &[f32], z: &mut [f32], dz: &mut [f32], o: &RowOpts<'_>) -> f32 {
    match (o.cap.is_some(), dz.is_empty()) {
        (false, _) => transform_max::<F, false, false>(row, z, &mut [], o),
        (true, true) => transform_max::<F, true, false>(row, z, &mut [], o),
        (true, false) => transform_max::<F, true, true>(row, z, dz, o),
    }
}

/// Σ_c w_c (m − z_c) (or Σ_c (m − z_c) without weights): f32 lanes within each block
/// of `BLOCK`, the blocks added in f64.
#[inline(always)]
fn smooth_sum<const W: bool>(z: &[f32], w: &[f32], m: f32) -> f64 {
    let mut total = 0.0f64;
    for (b, zb) in z.chunks(BLOCK).enumerate() {
        let wb = if W { &w[b * BLOCK..b * BLOCK + zb.len()] } else { zb };
        let (zc, wc) = (zb.chunks_exact(LANES), wb.chunks_exact(LANES));
        let (zr, wr) = (zc.remainder(), wc.remainder());
        let mut acc = [0.0f32; LANES];
        for (zc, wc) in zc.zip(wc) {
            for i in 0..LANES {
                let d = m - zc[i];
                acc[i] += if W { wc[i] * d } else { d };
            }
        }
        let mut s = 0.0f32;
        for (&z, &w) in zr.iter().zip(wr) {
            s += if W { w * (m - z) } else { m - z };
        }
        total += f64::from(s + acc.iter().sum::<f32>());
    }
    total
}

/// The gradient of one row under the options, every class as if it were not the target:
/// `(p_c k − sw w_c) · dz_c · f`. `MODE` is a set of bits: `W` class weights (else
/// w = 1), `C` a softcap's `dz` (else `f` holds the logit scale), `P` `g` holds
/// e_c = exp(z_c − max) already and `k` is divided by Σ e, so that no exp is needed
/// (else p_c = exp((z_c − m) − log_s) from `z`, for a saved LSE).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn grad_row<const MODE: u8>(
    z: &[f32],
    dz: &[f32],
    w: &[f32],
    g: &mut [f32],
    (m, log_s): (f32, f32),
    k: f32,
    sw: f32,
    f: f32,
) {
    let (weighted, capped, stored) = (MODE & W != 0, MODE & C != 0, MODE & P != 0);
    let term = |zi: f32, wi: f32, di: f32| {
        let p = if stored { zi } else { exp_f32((zi - m) - log_s) };
        let d = p * k - sw * wi;
        if capped { d * di * f } else { d * f }
    };
    let n = g.len();
    let body = n - n % LANES;
    for at in (0..body).step_by(LANES) {
        let zc: [f32; LANES] =
            if stored { &g[at..at + LANES] } else { &z[at..at + LANES] }.try_into().unwrap();
        let wc: &[f32] = if weighted { &w[at..at + LANES] } else { &zc };
        let dc: &[f32] = if capped { &dz[at..at + LANES] } else { &zc };
        let gc = &mut g[at..at + LANES];
        for i in 0..LANES {
            gc[i] = term(zc[i], if weighted { wc[i] } else { 1.0 }, dc[i]);
        }
    }
    for c in body..n {
        let zi = if stored { g[c] } else { z[c] };
        g[c] = term(zi, if weighted { w[c] } else { 1.0 }, if capped { dz[c] } else { 0.0 });
    }
}

/// The bits of [`grad_row`]'s and [`soft_grad`]'s `MODE`.
const W: u8 = 1;
const C: u8 = 2;
const P: u8 = 4;

/// Calls `f::<MODE>(args)` for the `MODE` in `mode` (a value below 8): one
/// monomorphised loop per option set.
macro_rules! by_mode {
    ($mode:expr, $f:ident($($arg:expr),* $(,)?)) => {
        by_mode!(@arms $mode, $f, ($($arg),*), 0 1 2 3 4 5 6 7)
    };
    (@arms $mode:expr, $f:ident, $args:tt, $($m:literal)*) => {
        match $mode {
            $($m => by_mode!(@call $f, $m, $args),)*
            _ => unreachable!("a mode has three bits"),
        }
    };
    (@call $f:ident, $m:literal, ($($arg:expr),*)) => {
        $f::<$m>($($arg),*)
    };
}

/// Where the gradient of a row takes its probabilities from.
#[derive(Clone, Copy)]
enum Probs<'a> {
    /// `g` holds e = exp(z − max), to be divided by Σ e; the target's p is taken as
    /// exp((z_y − max) − log Σ e) (`shift`: max and log Σ e), as on the plain path.
    Stored { z_y: f32, shift: (f32, f32), inv_sum: f32 },
    /// The transformed row `z` and a saved LSE: p = exp(z − lse).
    Saved { z: &'a [f32], lse: f32 },
}

/// The gradient of one counted row with target `y` under the options:
/// `[(1−ε) w_y (p − δ_y) + (ε/V)(W p − w) + 2 s' lse p] · dz · scale`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn options_grad(
    probs: Probs<'_>,
    dz: &[f32],
    g: &mut [f32],
    y: usize,
    lse: f32,
    scale: f32,
    o: &RowOpts<'_>,
) {
    let v = g.len();
    let (eps, wy) = (o.eps, o.weight(y));
    let mut k = (1.0 - eps) * wy;
    if eps > 0.0 {
        k += eps / v as f32 * o.total_weight as f32;
    }
    if o.z_grad > 0.0 {
        k += 2.0 * o.z_grad * lse;
    }
    let sw = eps / v as f32;
    let cap = o.cap.is_some();
    let f = if cap { scale } else { o.alpha * scale };
    let w = o.weights.unwrap_or(&[]);
    let mode = u8::from(o.weights.is_some()) * W + u8::from(cap) * C;
    let p_y = match probs {
        Probs::Stored { z_y, shift, inv_sum } => {
            by_mode!(mode + P, grad_row(&[], dz, w, g, (0.0, 0.0), k * inv_sum, sw, f));
            exp_f32((z_y - shift.0) - shift.1)
        }
        Probs::Saved { z, lse } => {
            by_mode!(mode, grad_row(z, dz, w, g, (lse, 0.0), k, sw, f));
            exp_f32(z[y] - lse)
        }
    };
    let d = (p_y * k - sw * wy) - (1.0 - eps) * wy;
    g[y] = if cap { d * dz[y] * scale } else { d * f };
}

/// One row with options. Loss only: the logits transformed into `sc.z` (scale, softcap)
/// with their max in one pass, then the sums at the max in another (untransformed rows:
/// the plain statistics). With the gradient `out`: the transformed row (and the
/// softcap's derivative, in `sc.dz`) goes into `out` itself, the second pass overwrites
/// it with e = exp(z − max) while it sums, and the gradient pass scales those in place:
/// one exp per element, and no second row buffer in the cache.
#[inline(always)]
fn process_row_with_options<const F: bool>(
    row: &[f32],
    target: i32,
    out: Option<&mut [f32]>,
    o: &RowOpts<'_>,
    sc: &mut Scratch,
    metrics: Option<&mut RowMetrics>,
) -> (f32, f32) {
    let v = row.len();
    let tr = o.transforms();
    let smooth = o.eps > 0.0;
    let y = (target != Batch::IGNORED).then_some(target as usize);
    let (m, s, smooth_sum, z_y, out) = match (out, metrics) {
        (None, None) => {
            let (m, s, sm) = options_stats::<F>(row, o, &mut sc.z, smooth);
            let z_y = y.map_or(0.0, |y| if tr { sc.z[y] } else { row[y] });
            (m, s, sm, z_y, None)
        }
        // The metrics' pass over the (transformed) row gives its max and sum too.
        (None, Some(slot)) => {
            if tr {
                transform_into::<F>(row, &mut sc.z, &mut [], o);
            }
            let z: &[f32] = if tr { &sc.z } else { row };
            let (m, s, rm) = row_stats_metrics(z, i64::from(target));
            *slot = rm;
            let sm = match (smooth, o.weights) {
                (false, _) => 0.0,
                (true, Some(w)) => smooth_sum::<true>(z, w, m),
                (true, None) => smooth_sum::<false>(z, &[], m),
            };
            (m, s, sm, y.map_or(0.0, |y| z[y]), None)
        }
        (Some(g), metrics) => {
            let m = if tr { transform_into::<F>(row, g, &mut sc.dz, o) } else { block_max(row) };
            let z_y = y.map_or(0.0, |y| if tr { g[y] } else { row[y] });
            // The metrics from the transformed row before e replaces it.
            if let Some(slot) = metrics {
                *slot = row_stats_metrics(if tr { g } else { row }, i64::from(target)).2;
            }
            let (s, sm, _) = sums_into::<F>(row, g, tr, if smooth { X_SMOOTH } else { X_NONE }, o, &[], m);
            (m, s, sm, z_y, Some(g))
        }
    };
    let log_s = s.ln() as f32;
    let lse = m + log_s;
    let Some(y) = y else {
        if let Some(g) = out {
            g.fill(0.0);
        }
        return (0.0, lse);
    };
    let (eps, wy) = (o.eps, o.weight(y));
    let mut loss = f64::from((1.0 - eps) * wy) * f64::from((m - z_y) + log_s);
    if smooth {
        // Σ_c w_c (lse − z_c) = Σ_c w_c (m − z_c) + W log s: non-negative terms (for
        // non-negative weights), so no cancellation.
        loss += f64::from(eps) / v as f64 * (smooth_sum + o.total_weight * f64::from(log_s));
    }
    if o.z_loss > 0.0 {
        loss += f64::from(o.z_loss) * f64::from(lse) * f64::from(lse);
    }
    if let Some(g) = out {
        let probs = Probs::Stored { z_y, shift: (m, log_s), inv_sum: (1.0 / s) as f32 };
        options_grad(probs, &sc.dz, g, y, lse, o.scale, o);
    }
    (loss as f32, lse)
}

/// Compiles `fn name(args) body` three times, for AVX-512, AVX2+FMA and the baseline, and
/// picks one at run time (the body and everything it inlines is vectorised for the
/// features of its copy). In the body, the constant `F` says whether the copy has FMA.
macro_rules! multiversion {
    ($(#[$attr:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) {
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn imp<const F: bool>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512($($arg: $ty),*) {
                imp::<true>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) {
                imp::<true>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features the function was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp::<false>($($arg),*)
        }
    };
}
pub(super) use multiversion;

multiversion! {
    /// One batch of rows: the plain row loop, or the one with options; and each row's
    /// metrics into `metrics` when given (in the plain loop's one read; with options,
    /// from the transformed row the loss reads).
    fn rows(
        logits: &[f32],
        v: usize,
        targets: &[i32],
        grad: Option<&mut [f32]>,
        loss: &mut [f32],
        lse: &mut [f32],
        o: &RowOpts<'_>,
        sc: &mut Scratch,
        metrics: Option<&mut [RowMetrics]>,
    ) {
        let rows = logits.chunks_exact(v).zip(targets).zip(loss.iter_mut().zip(lse.iter_mut()));
        // Each row's metrics slot, when asked.
        let mut slots = metrics.map(|m| m.iter_mut());
        let mut slot = move || slots.as_mut().and_then(Iterator::next);
        match (grad, o.plain) {
            (Some(g), true) => {
                for (((row, &t), (l, e)), out) in rows.zip(g.chunks_exact_mut(v)) {
                    (*l, *e) = process_row(row, t, o.scale, Some(out), slot());
                }
            }
            (None, true) => {
                for ((row, &t), (l, e)) in rows {
                    (*l, *e) = process_row(row, t, o.scale, None, slot());
                }
            }
            (Some(g), false) => {
                for (((row, &t), (l, e)), out) in rows.zip(g.chunks_exact_mut(v)) {
                    (*l, *e) = process_row_with_options::<F>(row, t, Some(out), o, sc, slot());
                }
            }
            (None, false) => {
                for ((row, &t), (l, e)) in rows {
                    (*l, *e) = process_row_with_options::<F>(row, t, None, o, sc, slot());
                }
            }
        }
    }
}

multiversion! {
    /// The separate backward of a batch of rows (the first is row `first` of the call)
    /// from their saved LSE.
    fn backward_rows(
        logits: &[f32],
        v: usize,
        targets: &[i32],
        lse: &[f32],
        upstream: Upstream<'_>,
        first: usize,
        grad: &mut [f32],
        o: &RowOpts<'_>,
        sc: &mut Scratch,
    ) {
        for (r, (row, g)) in logits.chunks_exact(v).zip(grad.chunks_exact_mut(v)).enumerate() {
            let t = targets[r];
            if t == Batch::IGNORED {
                g.fill(0.0);
                continue;
            }
            let z: &[f32] = if o.transforms() {
                transform_into::<F>(row, &mut sc.z, &mut sc.dz, o);
                &sc.z
            } else {
                row
            };
            let l = lse[r];
            let scale = o.scale * upstream.of_row(first + r);
            options_grad(Probs::Saved { z, lse: l }, &sc.dz, g, t as usize, l, scale, o);
        }
    }
}

/// Each row's metrics, when the options ask for them, and the slot of each task of
/// `step` rows in them (`None` when not asked).
fn metric_slots(
    metrics: &mut Option<Vec<RowMetrics>>,
    rows: usize,
    step: usize,
) -> Vec<Option<&mut [RowMetrics]>> {
    match metrics {
        Some(m) => m.chunks_mut(step).map(Some).collect(),
        None => (0..rows.div_ceil(step)).map(|_| None).collect(),
    }
}

/// The metrics of an output, from each row's.
fn finish_metrics(opts: &LossOptions, rows: Option<Vec<RowMetrics>>) -> Option<crate::Metrics> {
    Some(crate::Metrics::from_rows(opts.get_metrics()?, &rows?))
}

/// Rows per parallel task: about 256 KiB of logits, at least one row.
fn rows_per_task(v: usize) -> usize {
    ((1 << 16) / v.max(1)).max(1)
}

/// The row options of a class-index call.
fn class_opts<'a>(opts: &'a LossOptions, batch: &Batch) -> RowOpts<'a> {
    let reduction = opts.get_reduction();
    let z_grad = batch.z_gradient_loss_scale(opts.get_z_loss(), reduction);
    RowOpts::new(opts, batch.classes, batch.gradient_scale(reduction), z_grad)
}

fn run(logits: &[f32], batch: &Batch, opts: &LossOptions, grad: Option<&mut [f32]>) -> LossOutput {
    let (n, v) = (batch.rows, batch.classes);
    let mut loss = vec![0.0f32; n];
    let mut lse = vec![0.0f32; n];
    let step = rows_per_task(v);
    let o = class_opts(opts, batch);
    let mut metrics = opts.get_metrics().map(|_| vec![RowMetrics::UNSET; n]);
    let slots = metric_slots(&mut metrics, n, step);
    let tasks = logits
        .par_chunks(step * v)
        .zip(batch.targets.par_chunks(step))
        .zip(loss.par_chunks_mut(step).zip(lse.par_chunks_mut(step)))
        .zip(slots);
    match grad {
        Some(g) => tasks.zip(g.par_chunks_mut(step * v)).for_each(|((((l, t), (lo, ls)), m), g)| {
            rows(l, v, t, Some(g), lo, ls, &o, &mut Scratch::new(v, &o, true, false), m)
        }),
        None => tasks.for_each(|(((l, t), (lo, ls)), m)| {
            rows(l, v, t, None, lo, ls, &o, &mut Scratch::new(v, &o, false, false), m)
        }),
    }
    let mut out = output(loss, lse, step, batch, opts);
    out.metrics = finish_metrics(opts, metrics);
    out
}

/// The output from the row losses and LSEs. The reduction: per-task partial sums in f64,
/// added in a fixed order, so the result does not depend on the thread count. With
/// z-loss, its part `s · lse²` of the counted rows is summed the same way and divided by
/// the z-loss divisor ([`Batch::reduce_with_z`]).
fn output(loss: Vec<f32>, lse: Vec<f32>, step: usize, batch: &Batch, opts: &LossOptions) -> LossOutput {
    let reduction = opts.get_reduction();
    let total: f64 = loss.chunks(step).map(|c| c.iter().map(|&x| f64::from(x)).sum::<f64>()).sum();
    let s = f64::from(opts.get_z_loss() as f32);
    let (loss_value, z_loss) = if s > 0.0 && reduction != Reduction::None {
        let z_sum: f64 = lse
            .chunks(step)
            .zip(batch.targets.chunks(step))
            .map(|(l, t)| {
                l.iter()
                    .zip(t)
                    .filter(|&(_, &t)| t != Batch::IGNORED)
                    .map(|(&l, _)| s * f64::from(l) * f64::from(l))
                    .sum::<f64>()
            })
            .sum();
        batch.reduce_with_z(total, z_sum, reduction)
    } else {
        (batch.reduce(total, reduction), None)
    };
    LossOutput {
        loss: loss_value,
        row_losses: opts.wants_row_losses().then_some(loss),
        lse: opts.wants_lse().then_some(lse),
        gradient: None,
        z_loss,
        ..Default::default()
    }
}

/// The fast CPU loss (and gradient, if asked).
pub fn cross_entropy<'t>(
    logits: &[f32],
    classes: usize,
    targets: impl Into<Targets<'t>>,
    opts: &LossOptions,
) -> Result<LossOutput> {
    let batch = Batch::new(logits.len(), classes, targets.into(), opts)?;
    if !opts.wants_gradient() {
        return Ok(run(logits, &batch, opts, None));
    }
    let mut grad = vec![0.0f32; logits.len()];
    let mut out = run(logits, &batch, opts, Some(&mut grad));
    out.gradient = Some(grad);
    Ok(out)
}

/// As [`cross_entropy`], with the gradient written into `grad`.
pub fn cross_entropy_into<'t>(
    logits: &[f32],
    classes: usize,
    targets: impl Into<Targets<'t>>,
    opts: &LossOptions,
    grad: &mut [f32],
) -> Result<LossOutput> {
    let batch = Batch::new(logits.len(), classes, targets.into(), opts)?;
    crate::gpu::check_grad_len(grad.len(), logits.len())?;
    Ok(run(logits, &batch, opts, Some(grad)))
}

/// As [`cross_entropy`], with the gradient written over `logits`. Each row is read for
/// its statistics before its gradient overwrites it.
pub fn cross_entropy_in_place<'t>(
    logits: &mut [f32],
    classes: usize,
    targets: impl Into<Targets<'t>>,
    opts: &LossOptions,
) -> Result<LossOutput> {
    let batch = Batch::new(logits.len(), classes, targets.into(), opts)?;
    let (n, v) = (batch.rows, batch.classes);
    let mut loss = vec![0.0f32; n];
    let mut lse = vec![0.0f32; n];
    let step = rows_per_task(v);
    let o = class_opts(opts, &batch);
    let mut metrics = opts.get_metrics().map(|_| vec![RowMetrics::UNSET; n]);
    let slots = metric_slots(&mut metrics, n, step);
    logits
        .par_chunks_mut(step * v)
        .zip(batch.targets.par_chunks(step))
        .zip(loss.par_chunks_mut(step).zip(lse.par_chunks_mut(step)))
        .zip(slots)
        .for_each(|(((l, t), (lo, ls)), mut m)| {
            // One row at a time through a row-sized buffer, so the row is still intact
            // while its statistics are taken.
            let mut tmp = vec![0.0f32; v];
            let mut sc = Scratch::new(v, &o, true, false);
            for (r, row) in l.chunks_exact_mut(v).enumerate() {
                let m = m.as_deref_mut().map(|m| &mut m[r..r + 1]);
                rows(
                    row,
                    v,
                    &t[r..r + 1],
                    Some(&mut tmp),
                    &mut lo[r..r + 1],
                    &mut ls[r..r + 1],
                    &o,
                    &mut sc,
                    m,
                );
                row.copy_from_slice(&tmp);
            }
        });
    let mut out = output(loss, lse, step, &batch, opts);
    out.metrics = finish_metrics(opts, metrics);
    Ok(out)
}

/// The separate backward on the CPU: the gradient from the logits and the per-row LSE a
/// forward saved, times the upstream gradient; rows in parallel.
pub fn cross_entropy_backward<'t>(
    logits: &[f32],
    classes: usize,
    targets: impl Into<Targets<'t>>,
    lse: &[f32],
    upstream: Upstream<'_>,
    opts: &LossOptions,
) -> Result<Vec<f32>> {
    let batch = Batch::new(logits.len(), classes, targets.into(), opts)?;
    crate::cpu::reference::check_lse(lse, batch.rows)?;
    upstream.check(batch.rows)?;
    let v = classes;
    let o = class_opts(opts, &batch);
    let step = rows_per_task(v);
    let mut grad = vec![0.0f32; logits.len()];
    grad.par_chunks_mut(step * v)
        .zip(logits.par_chunks(step * v))
        .zip(batch.targets.par_chunks(step).zip(lse.par_chunks(step)))
        .enumerate()
        .for_each(|(i, ((g, l), (t, e)))| {
            backward_rows(l, v, t, e, upstream, i * step, g, &o, &mut Scratch::new(v, &o, true, true))
        });
    Ok(grad)
}

/// Binary cross-entropy with logits on the CPU (see
/// [`crate::cpu::reference::binary_cross_entropy`]): elementwise, rows in parallel, the
/// vectorised exp; f64 partial sums per task.
pub fn binary_cross_entropy(
    logits: &[f32],
    classes: usize,
    targets: &[f32],
    opts: &LossOptions,
) -> Result<LossOutput> {
    let rows = crate::options::check_binary(logits.len(), targets.len(), classes, opts)?;
    let v = classes;
    let denom = match opts.get_reduction() {
        Reduction::Mean => opts.mean_denominator((rows * v) as f64),
        _ => 1.0,
    };
    let scale = (1.0 / denom) as f32;
    let (weights, pos) = (opts.get_weights(), opts.get_pos_weight());
    let step = rows_per_task(v) * v;
    let mut losses = vec![0.0f32; logits.len()];
    let mut grad = vec![0.0f32; if opts.wants_gradient() { logits.len() } else { 0 }];
    let want_grad = opts.wants_gradient();
    let element = |i: usize, x: f32, y: f32| -> (f32, f32) {
        let c = i % v;
        let (w, pw) = (weights.map_or(1.0, |w| w[c]), pos.map_or(1.0, |p| p[c]));
        let e = exp_f32(-x.abs());
        let softplus_neg = (-x).max(0.0) + e.ln_1p();
        let coef = 1.0 + (pw - 1.0) * y;
        let loss = w * ((1.0 - y) * x + coef * softplus_neg);
        // σ(x) from the same e: 1/(1+e) for x >= 0, e/(1+e) below.
        let sigma = if x >= 0.0 { 1.0 / (1.0 + e) } else { e / (1.0 + e) };
        let sigma = if x.is_nan() { x } else { sigma };
        (loss, w * (coef * sigma - pw * y) * scale)
    };
    let partials: Vec<f64> = if want_grad {
        losses
            .par_chunks_mut(step)
            .zip(grad.par_chunks_mut(step))
            .enumerate()
            .map(|(k, (l, g))| {
                let first = k * step;
                let mut sum = 0.0f64;
                for (j, (l, g)) in l.iter_mut().zip(g).enumerate() {
                    let i = first + j;
                    (*l, *g) = element(i, logits[i], targets[i]);
                    sum += f64::from(*l);
                }
                sum
            })
            .collect()
    } else {
        losses
            .par_chunks_mut(step)
            .enumerate()
            .map(|(k, l)| {
                let first = k * step;
                let mut sum = 0.0f64;
                for (j, l) in l.iter_mut().enumerate() {
                    let i = first + j;
                    *l = element(i, logits[i], targets[i]).0;
                    sum += f64::from(*l);
                }
                sum
            })
            .collect()
    };
    let total: f64 = partials.iter().sum();
    Ok(LossOutput {
        loss: (opts.get_reduction() != Reduction::None).then(|| (total / denom) as f32),
        row_losses: opts.wants_row_losses().then_some(losses),
        lse: None,
        gradient: want_grad.then_some(grad),
        z_loss: None,
        ..Default::default()
    })
}

/// The gradient of a row of probability targets from the e = exp(z − max) in `g`:
/// `(e_c k − w_c t'_c) · dz_c · f` with `k` divided by Σ e (`MODE`: [`W`] class weights,
/// [`C`] a softcap's `dz`, else `f` holds the logit scale).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn soft_grad<const MODE: u8>(ts: &[f32], dz: &[f32], w: &[f32], g: &mut [f32], k: f32, eps: f32, f: f32) {
    let (weighted, capped) = (MODE & W != 0, MODE & C != 0);
    let smooth = eps / g.len() as f32;
    let term = |e: f32, ti: f32, wi: f32, di: f32| {
        let t = (1.0 - eps) * ti + smooth;
        let wt = if weighted { wi * t } else { t };
        let d = e * k - wt;
        if capped { d * di * f } else { d * f }
    };
    let n = g.len();
    let body = n - n % LANES;
    for at in (0..body).step_by(LANES) {
        let tc = &ts[at..at + LANES];
        let wc: &[f32] = if weighted { &w[at..at + LANES] } else { tc };
        let dc: &[f32] = if capped { &dz[at..at + LANES] } else { tc };
        let gc = &mut g[at..at + LANES];
        for i in 0..LANES {
            gc[i] = term(gc[i], tc[i], if weighted { wc[i] } else { 1.0 }, dc[i]);
        }
    }
    for c in body..n {
        g[c] = term(g[c], ts[c], if weighted { w[c] } else { 1.0 }, if capped { dz[c] } else { 0.0 });
    }
}

multiversion! {
    /// One batch of rows with probability targets: the same passes as
    /// [`process_row_with_options`], the label sums taken with Σ exp; each row's metrics
    /// into `metrics` when given, from the (transformed) row the sums read.
    fn soft_rows(
        logits: &[f32],
        targets: &[f32],
        v: usize,
        grad: Option<&mut [f32]>,
        loss: &mut [f32],
        lse: &mut [f32],
        o: &RowOpts<'_>,
        sc: &mut Scratch,
        metrics: Option<&mut [RowMetrics]>,
    ) {
        let tr = o.transforms();
        let mut grad = grad.map(|g| g.chunks_exact_mut(v));
        let mut slots = metrics.map(|m| m.iter_mut());
        for (r, (row, ts)) in logits.chunks_exact(v).zip(targets.chunks_exact(v)).enumerate() {
            let g = grad.as_mut().and_then(|g| g.next());
            let mut metrics_of = |z: &[f32]| {
                if let Some(slot) = slots.as_mut().and_then(Iterator::next) {
                    *slot = row_stats_metrics(z, crate::metrics::target_class(ts) as i64).2;
                }
            };
            let (m, (s, a, b), g) = match g {
                None => {
                    let m = if tr { transform_into::<F>(row, &mut sc.z, &mut [], o) } else { block_max(row) };
                    let z = if tr { &sc.z } else { row };
                    metrics_of(z);
                    (m, sums_of::<F>(z, X_SOFT, o, ts, m), None)
                }
                Some(g) => {
                    let m = if tr { transform_into::<F>(row, g, &mut sc.dz, o) } else { block_max(row) };
                    metrics_of(if tr { g } else { row });
                    (m, sums_into::<F>(row, g, tr, X_SOFT, o, ts, m), Some(g))
                }
            };
            let log_s = s.ln() as f32;
            let l = m + log_s;
            // Σ_c w_c t'_c ((m − z_c) + log s), the zero-weight terms left out.
            let mut row_loss = b + a * f64::from(log_s);
            if o.z_loss > 0.0 {
                row_loss += f64::from(o.z_loss) * f64::from(l) * f64::from(l);
            }
            (loss[r], lse[r]) = (row_loss as f32, l);
            if let Some(g) = g {
                let k = (a as f32 + 2.0 * o.z_grad * l) * (1.0 / s) as f32;
                let cap = o.cap.is_some();
                let f = if cap { o.scale } else { o.alpha * o.scale };
                let mode = u8::from(o.weights.is_some()) * W + u8::from(cap) * C;
                by_mode!(mode, soft_grad(ts, &sc.dz, o.weights.unwrap_or(&[]), g, k, o.eps, f));
            }
        }
    }
}

/// Cross-entropy with probability targets on the CPU (see
/// [`crate::cpu::reference`]): rows in parallel, the same vectorised row loops as the
/// class-index path; every part, z-loss included, divides by N (or `n_items`) under
/// `mean`.
pub fn cross_entropy_soft(
    logits: &[f32],
    classes: usize,
    targets: &[f32],
    opts: &LossOptions,
) -> Result<LossOutput> {
    let (denom, rows) = crate::options::check_soft(logits.len(), targets.len(), classes, opts)?;
    let v = classes;
    let reduction = opts.get_reduction();
    let d = match reduction {
        Reduction::Mean => denom,
        _ => 1.0,
    };
    let o = RowOpts::new(opts, v, (1.0 / d) as f32, opts.get_z_loss());
    let want_grad = opts.wants_gradient();
    let step = rows_per_task(v);
    let mut losses = vec![0.0f32; rows];
    let mut lses = vec![0.0f32; rows];
    let mut grad = vec![0.0f32; if want_grad { logits.len() } else { 0 }];
    let mut metrics = opts.get_metrics().map(|_| vec![RowMetrics::UNSET; rows]);
    let slots = metric_slots(&mut metrics, rows, step);
    let tasks = logits
        .par_chunks(step * v)
        .zip(targets.par_chunks(step * v))
        .zip(losses.par_chunks_mut(step).zip(lses.par_chunks_mut(step)))
        .zip(slots);
    if want_grad {
        tasks.zip(grad.par_chunks_mut(step * v)).for_each(|((((x, t), (lo, ls)), m), g)| {
            let mut sc = Scratch::new(v, &o, true, false);
            soft_rows(x, t, v, Some(g), lo, ls, &o, &mut sc, m)
        });
    } else {
        tasks.for_each(|(((x, t), (lo, ls)), m)| {
            let mut sc = Scratch::new(v, &o, false, false);
            soft_rows(x, t, v, None, lo, ls, &o, &mut sc, m)
        });
    }
    let sum = |xs: &[f32], f: &dyn Fn(f32) -> f64| -> f64 {
        xs.chunks(step).map(|c| c.iter().map(|&x| f(x)).sum::<f64>()).sum()
    };
    let total = sum(&losses, &|x| f64::from(x));
    let reduced = reduction != Reduction::None;
    let s = f64::from(o.z_loss);
    let z_loss = (reduced && s > 0.0).then(|| (sum(&lses, &|l| s * f64::from(l) * f64::from(l)) / d) as f32);
    Ok(LossOutput {
        loss: reduced.then(|| (total / d) as f32),
        row_losses: opts.wants_row_losses().then_some(losses),
        lse: opts.wants_lse().then_some(lses),
        gradient: want_grad.then_some(grad),
        z_loss,
        metrics: finish_metrics(opts, metrics),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backend, Gradient, Labels, Logits, Problem};

    #[test]
    fn polynomial_exp_is_accurate_and_safe_at_the_edges() {
        let mut worst = 0.0f64;
        let mut x = -100.0f32;
        while x < 88.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_f32(x));
            if want > 1e-37 {
                worst = worst.max((got - want).abs() / want);
            }
            if x <= 0.0 && want > 1.2e-38 {
                // The lean twin agrees wherever the result is a normal number.
                assert_eq!(exp_neg::<false>(x), exp_f32(x), "{x}");
                let fused = f64::from(exp_neg::<true>(x));
                assert!((fused - want).abs() <= 4e-7 * want, "{x}: {fused} against {want}");
            }
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_neg::<false>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_neg::<true>(-1000.0), 0.0);
        assert!(exp_neg::<false>(f32::NAN).is_nan() && exp_neg::<true>(f32::NAN).is_nan());
        assert_eq!(exp_neg::<true>(0.0), 1.0);
    }

    /// tanh within 3.5 ULP (and 2.5e-7 relative) and 1 − tanh² within 4e-7 relative
    /// (1.5e-7 below |u| = 0.5), with and without FMA, over [−20, 20] and tiny
    /// arguments; the edges exact.
    #[test]
    fn tanh_and_its_derivative_are_accurate_everywhere() {
        fn check<const F: bool>() {
            let (mut worst_ulp, mut worst_rel, mut worst_s2, mut worst_near) =
                (0.0f64, 0.0f64, 0.0f64, 0.0f64);
            let mut args: Vec<f32> = (0..400_001).map(|i| -20.0 + i as f32 * 1e-4).collect();
            args.extend((0..2000).map(|i| 1e-30f32 * 1.03f32.powi(i)).filter(|x| *x < 1.0));
            for u in args {
                let (t, s2) = tanh_sech2::<F>(u);
                let want = f64::from(u).tanh();
                let ulp = f64::from(((want.abs() as f32).next_up()) - want.abs() as f32);
                let err = (f64::from(t) - want).abs();
                worst_ulp = worst_ulp.max(err / ulp);
                if want != 0.0 {
                    worst_rel = worst_rel.max(err / want.abs());
                }
                let want_s2 = 1.0 / f64::from(u).cosh().powi(2);
                if want_s2 > 1e-37 {
                    let rel = (f64::from(s2) - want_s2).abs() / want_s2;
                    worst_s2 = worst_s2.max(rel);
                    if u.abs() < 0.5 {
                        worst_near = worst_near.max(rel);
                    }
                }
            }
            assert!(
                worst_ulp < 3.5 && worst_rel < 2.5e-7,
                "fma {F}: tanh {worst_ulp} ULP, {worst_rel} relative"
            );
            assert!(
                worst_s2 < 4e-7 && worst_near < 1.5e-7,
                "fma {F}: 1 − tanh² relative error {worst_s2}, {worst_near} near 0"
            );
            assert_eq!(tanh_sech2::<F>(0.0), (0.0, 1.0));
            assert!(tanh_sech2::<F>(-0.0).0.is_sign_negative());
            assert_eq!(tanh_sech2::<F>(f32::INFINITY).0, 1.0);
            assert_eq!(tanh_sech2::<F>(f32::NEG_INFINITY).0, -1.0);
            assert!(tanh_sech2::<F>(f32::INFINITY).1 < 1e-37);
            let (t, s2) = tanh_sech2::<F>(f32::NAN);
            assert!(t.is_nan() && s2.is_nan());
        }
        check::<false>();
        check::<true>();
    }

    fn evaluate(
        path: &dyn Backend,
        x: &[f32],
        v: usize,
        t: &[i64],
        opts: &LossOptions,
        grad: bool,
    ) -> LossOutput {
        let problem = Problem::new(Logits::F32(x), v, Labels::from(t)).row_losses(true).lse(true);
        let problem = if grad { problem.gradient(Gradient::Owned) } else { problem };
        path.evaluate(problem, opts).unwrap()
    }

    /// The z-loss contract by hand: 3 rows of 4 classes, weights [2, 1, 1, 1], one row
    /// ignored, z-loss 0.1, `mean`: the cross-entropy part divides by Σ w_y of the counted
    /// rows, the z-loss part by their number; the gradient's z part is 2 s lse p / 2.
    #[test]
    fn z_loss_divides_by_the_counted_rows_under_mean() {
        let x = [1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0, 1.0, 2.0, -2.0, 0.5, 1.5, 0.0];
        let t = [0i64, -100, 2];
        let (w, s) = ([2.0f64, 1.0, 1.0, 1.0], 0.1f64);
        let opts = LossOptions::new().weights(w.map(|w| w as f32).to_vec()).z_loss(s);
        let lse = |r: usize| x[r * 4..r * 4 + 4].iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
        let ce = |r: usize, y: usize| w[y] * (lse(r) - f64::from(x[r * 4 + y]));
        let (ce_sum, wy_sum) = (ce(0, 0) + ce(2, 2), w[0] + w[2]);
        let z_part = s * (lse(0).powi(2) + lse(2).powi(2)) / 2.0;
        let want_loss = ce_sum / wy_sum + z_part;
        for (name, out) in [
            ("fast", evaluate(&crate::CpuFast, &x, 4, &t, &opts, true)),
            ("reference", evaluate(&crate::Reference, &x, 4, &t, &opts, true)),
        ] {
            let close = |got: f32, want: f64, what: &str| {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-6 * want.abs().max(1e-3),
                    "{name} {what}: {got} vs {want}"
                );
            };
            close(out.loss.unwrap(), want_loss, "loss");
            close(out.z_loss.unwrap(), z_part, "z-loss part");
            let rows = out.row_losses.unwrap();
            close(rows[0], ce(0, 0) + s * lse(0).powi(2), "row 0");
            assert_eq!(rows[1], 0.0);
            close(rows[2], ce(2, 2) + s * lse(2).powi(2), "row 2");
            let g = out.gradient.unwrap();
            assert!(g[4..8].iter().all(|&g| g == 0.0), "{name}: the ignored row's gradient is 0");
            for (r, y) in [(0usize, 0usize), (2, 2)] {
                for c in 0..4 {
                    let p = (f64::from(x[r * 4 + c]) - lse(r)).exp();
                    let d = if c == y { 1.0 } else { 0.0 };
                    let want = w[y] * (p - d) / wy_sum + 2.0 * s * lse(r) * p / 2.0;
                    assert!(
                        (f64::from(g[r * 4 + c]) - want).abs() < 1e-7,
                        "{name} grad[{r}][{c}]: {} vs {want}",
                        g[r * 4 + c]
                    );
                }
            }
        }
        // `sum`: no division; `none`: no reduced loss and no z part.
        let sum = evaluate(&crate::CpuFast, &x, 4, &t, &opts.clone().reduction(Reduction::Sum), false);
        let want = ce_sum + 2.0 * z_part;
        assert!((f64::from(sum.loss.unwrap()) - want).abs() < 1e-5, "{:?} vs {want}", sum.loss);
        assert!((f64::from(sum.z_loss.unwrap()) - 2.0 * z_part).abs() < 1e-6);
        let none = evaluate(&crate::CpuFast, &x, 4, &t, &opts.clone().reduction(Reduction::None), false);
        assert_eq!((none.loss, none.z_loss), (None, None));
        // No z-loss: no z part reported.
        let plain = evaluate(&crate::CpuFast, &x, 4, &t, &LossOptions::new(), false);
        assert_eq!(plain.z_loss, None);
    }

    /// The option sets of the row loops against the f64 reference (loss rtol 1e-5 + 1e-6,
    /// gradient atol 1e-6), class indices and probabilities, loss only and with the
    /// gradient, on rows longer than a block with a remainder; and bit-identical on 1 and
    /// 2 threads.
    #[test]
    fn option_sets_match_the_reference_and_not_the_thread_count() {
        let (n, v) = (37, 1000 + 13);
        let mut x = crate::synth::logits(n, v, 3.0, 7);
        let mut t = crate::synth::targets(n, v, 8);
        t[3] = -100;
        x[5 * v + 17] = f32::NEG_INFINITY;
        let w: Vec<f32> = (0..v).map(|c| 0.25 + (c % 7) as f32 * 0.25).collect();
        let probs: Vec<f32> = {
            let u = crate::synth::logits(n, v, 1.0, 9);
            let mut p = vec![0.0f32; n * v];
            for (p, u) in p.chunks_mut(v).zip(u.chunks(v)) {
                let e: Vec<f64> = u.iter().map(|&u| f64::from(u).exp()).collect();
                let s: f64 = e.iter().sum();
                p.iter_mut().zip(&e).for_each(|(p, e)| *p = (e / s) as f32);
            }
            p
        };
        let sets = [
            LossOptions::new(),
            LossOptions::new().label_smoothing(0.1),
            LossOptions::new().softcap(30.0),
            LossOptions::new().softcap(2.5).logit_scale(1.3).reduction(Reduction::Sum),
            LossOptions::new().weights(w.clone()),
            LossOptions::new().z_loss(1e-3),
            LossOptions::new().logit_scale(0.7).z_loss(1e-4).n_items(50.0),
            LossOptions::new().weights(w.clone()).label_smoothing(0.2).softcap(30.0).z_loss(1e-4),
            LossOptions::new()
                .weights(w)
                .label_smoothing(0.1)
                .softcap(15.0)
                .z_loss(1e-3)
                .reduction(Reduction::None),
        ];
        let tol = crate::check::Tolerance::F32;
        let pool = |k| rayon::ThreadPoolBuilder::new().num_threads(k).build().unwrap();
        let mut worst = (0.0f64, 0.0f64);
        for opts in &sets {
            for grad in [false, true] {
                for soft in [false, true] {
                    let run = |path: &dyn Backend| {
                        let labels = if soft { Labels::Probabilities(&probs) } else { Labels::from(&t) };
                        let p = Problem::new(Logits::F32(&x), v, labels).row_losses(true).lse(true);
                        let p = if grad { p.gradient(Gradient::Owned) } else { p };
                        path.evaluate(p, opts).unwrap()
                    };
                    let want = run(&crate::Reference);
                    let got = run(&crate::CpuFast);
                    let agreement = crate::check::compare(&got, &want, tol)
                        .unwrap_or_else(|e| panic!("{opts:?} grad {grad} soft {soft}: {e}"));
                    worst.0 = worst.0.max(agreement.loss_ratio);
                    worst.1 = worst.1.max(agreement.grad_err);
                    assert_eq!(got.z_loss.is_some(), want.z_loss.is_some(), "{opts:?}");
                    let one = pool(1).install(|| run(&crate::CpuFast));
                    let two = pool(2).install(|| run(&crate::CpuFast));
                    assert_eq!(one, two, "{opts:?}: the thread count changed the result");
                }
            }
        }
        eprintln!("worst loss error {:.3} of the tolerance, worst gradient error {:.2e}", worst.0, worst.1);
    }
}
