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
use crate::options::{Batch, LossOptions, LossOutput, Reduction, Targets, Upstream};

/// Elements per block of the online softmax (a whole number of SIMD vectors).
const BLOCK: usize = 64;
/// Lanes the inner loops are written for (LLVM maps them to 2 AVX2 or 4 SSE registers).
const LANES: usize = 16;

/// `exp(x)` for f32 with a relative error of a few ULP: `2^n · p(r)` with `n =
/// round(x / ln 2)`, `r = x − n ln 2` in two parts, and a degree-6 polynomial. −inf
/// gives 0, large x gives +inf, NaN stays NaN. Written branch-free so that it vectorises.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
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
/// third of the work of tanh through `exp` and an odd series for small |u|, with the same
/// accuracy: tanh within 3.1 ULP, 1 − tanh² within 3.3e-7 relative). With x = −2|u|
/// (at least −87), n = round(x / ln 2), r = x − n ln 2 and q(r) ≈ (eʳ − 1) / r (degree
/// 5), e = 2ⁿ (1 + r q) = exp(x) and E = 2ⁿ r q + (2ⁿ − 1) = expm1(x), which does not
/// cancel near 0 (there n = 0 and E = r q). Then tanh |u| = −E / (1 + e) and
/// 1 − tanh² = 4 e / (1 + e)² (no cancellation near |tanh| = 1 either). ±1 at ±inf (and
/// 1 − tanh² ≈ 7e-38), NaN for NaN.
#[inline(always)]
fn tanh_sech2<const F: bool>(u: f32) -> (f32, f32) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0;
    // Near-minimax for (eʳ − 1) / r on |r| ≤ ln 2 / 2 (relative error 1.1e-8).
    const Q: [f32; 6] = [1.0, 0.499_999_97, 0.166_665_06, 0.041_667_137, 0.008_369_104, 0.001_388_887_3];
    let fma = mul_add::<F>;
    let x = -2.0 * u.abs();
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
    ((-em1 * rd).copysign(u), 4.0 * e * rd * rd)
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
fn row_stats(row: &[f32]) -> (f32, f64) {
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

/// Everything about one row without options: loss, LSE, and its gradient if `out` is
/// given.
#[inline(always)]
fn process_row(row: &[f32], target: i32, scale: f32, out: Option<&mut [f32]>) -> (f32, f32) {
    let (m, s) = row_stats(row);
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
    fn new(v: usize, o: &RowOpts<'_>, grad: bool) -> Self {
        let z = if o.transforms() { v } else { 0 };
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
        if DZ {
            let dc = &mut dz[j * LANES..j * LANES + LANES];
            for i in 0..LANES {
                (zc[i], dc[i]) = one(xc[i]);
            }
        } else {
            for i in 0..LANES {
                zc[i] = one(xc[i]).0;
            }
        }
        for i in 0..LANES {
            mx[i] = if zc[i] > mx[i] { zc[i] } else { mx[i] };
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

/// (Σ_c exp(z_c − m), Σ_c w_c (m − z_c)) of a row whose max `m` is known (the second
/// only when `S`, with `w` = 1 unless `W`): f32 lanes within each block of `BLOCK`,
/// each block's lanes added as a tree into an f64 total.
#[inline(always)]
fn sums_at_max<const F: bool, const S: bool, const W: bool>(z: &[f32], w: &[f32], m: f32) -> (f64, f64) {
    let (mut te, mut ts) = (0.0f64, 0.0f64);
    for (b, zb) in z.chunks(BLOCK).enumerate() {
        let wb = if W { &w[b * BLOCK..b * BLOCK + zb.len()] } else { zb };
        let (mut se, mut ss) = ([0.0f32; LANES], [0.0f32; LANES]);
        let (zc, wc) = (zb.chunks_exact(LANES), wb.chunks_exact(LANES));
        let (zr, wr) = (zc.remainder(), wc.remainder());
        for (zc, wc) in zc.zip(wc) {
            for i in 0..LANES {
                se[i] += exp_neg::<F>(zc[i] - m);
                if S {
                    let d = m - zc[i];
                    ss[i] += if W { wc[i] * d } else { d };
                }
            }
        }
        for (i, (&zc, &wc)) in zr.iter().zip(wr).enumerate() {
            se[i] += exp_neg::<F>(zc - m);
            if S {
                let d = m - zc;
                ss[i] += if W { wc * d } else { d };
            }
        }
        te += f64::from(tree_sum(se));
        if S {
            ts += f64::from(tree_sum(ss));
        }
    }
    (te, ts)
}

/// The statistics of a row under the options: (max, Σ exp(z − max), and when `smooth`
/// the label-smoothing sum Σ_c w_c (max − z_c)). The transformed row is then in `sc.z`
/// when [`RowOpts::transforms`] (else it is `row` itself, whose statistics are then
/// those of the plain loss), and its derivative in `sc.dz` when `with_dz`.
#[inline(always)]
fn options_stats<const F: bool>(
    row: &[f32],
    o: &RowOpts<'_>,
    sc: &mut Scratch,
    with_dz: bool,
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
    let m = match (o.cap.is_some(), with_dz) {
        (false, _) => transform_max::<F, false, false>(row, &mut sc.z, &mut [], o),
        (true, false) => transform_max::<F, true, false>(row, &mut sc.z, &mut [], o),
        (true, true) => transform_max::<F, true, true>(row, &mut sc.z, &mut sc.dz, o),
    };
    let z = &sc.z;
    let (s, sm) = match (smooth, o.weights) {
        (false, _) => sums_at_max::<F, false, false>(z, &[], m),
        (true, Some(w)) => sums_at_max::<F, true, true>(z, w, m),
        (true, None) => sums_at_max::<F, true, false>(z, &[], m),
    };
    (m, s, sm)
}

/// The transformed row into `sc.z` (and `sc.dz` under a softcap), without statistics.
#[inline(always)]
fn transform_row<const F: bool>(row: &[f32], o: &RowOpts<'_>, sc: &mut Scratch) {
    match o.cap.is_some() {
        false => transform_max::<F, false, false>(row, &mut sc.z, &mut [], o),
        true => transform_max::<F, true, true>(row, &mut sc.z, &mut sc.dz, o),
    };
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
/// `(p_c k − sw w_c) · dz_c · f` (`W`: class weights, else w = 1; `C`: a softcap's
/// `dz`, else `f` holds the logit scale), with `p_c = exp((z_c − m) − log_s)` (through
/// [`exp_neg`] when `NEG`: the statistics are the row's own, so the argument is ≤ 0).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn grad_row<const F: bool, const W: bool, const C: bool, const NEG: bool>(
    z: &[f32],
    dz: &[f32],
    w: &[f32],
    g: &mut [f32],
    (m, log_s): (f32, f32),
    k: f32,
    sw: f32,
    f: f32,
) {
    let term = |zi: f32, wi: f32, di: f32| {
        let x = (zi - m) - log_s;
        let d = if NEG { exp_neg::<F>(x) } else { exp_f32(x) } * k - sw * wi;
        if C { d * di * f } else { d * f }
    };
    let n = z.len();
    let body = n - n % LANES;
    for (j, (zc, gc)) in z[..body].chunks_exact(LANES).zip(g[..body].chunks_exact_mut(LANES)).enumerate() {
        let at = j * LANES;
        let wc = if W { &w[at..at + LANES] } else { zc };
        let dc = if C { &dz[at..at + LANES] } else { zc };
        for i in 0..LANES {
            gc[i] = term(zc[i], if W { wc[i] } else { 1.0 }, dc[i]);
        }
    }
    for c in body..n {
        g[c] = term(z[c], if W { w[c] } else { 1.0 }, if C { dz[c] } else { 0.0 });
    }
}

/// The gradient of one counted row with target `y` under the options:
/// `[(1−ε) w_y (p − δ_y) + (ε/V)(W p − w) + 2 s' lse p] · dz · scale`, with
/// `p = exp((z − m) − log_s)` (`saved`: `m` is a saved LSE and `log_s` 0).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn options_grad<const F: bool>(
    z: &[f32],
    dz: &[f32],
    g: &mut [f32],
    y: usize,
    (m, log_s): (f32, f32),
    lse: f32,
    scale: f32,
    o: &RowOpts<'_>,
    saved: bool,
) {
    let v = z.len();
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
    let shift = (m, log_s);
    match (o.weights, cap, saved) {
        (Some(w), true, false) => grad_row::<F, true, true, true>(z, dz, w, g, shift, k, sw, f),
        (Some(w), false, false) => grad_row::<F, true, false, true>(z, dz, w, g, shift, k, sw, f),
        (None, true, false) => grad_row::<F, false, true, true>(z, dz, &[], g, shift, k, sw, f),
        (None, false, false) => grad_row::<F, false, false, true>(z, dz, &[], g, shift, k, sw, f),
        (Some(w), true, true) => grad_row::<F, true, true, false>(z, dz, w, g, shift, k, sw, f),
        (Some(w), false, true) => grad_row::<F, true, false, false>(z, dz, w, g, shift, k, sw, f),
        (None, true, true) => grad_row::<F, false, true, false>(z, dz, &[], g, shift, k, sw, f),
        (None, false, true) => grad_row::<F, false, false, false>(z, dz, &[], g, shift, k, sw, f),
    }
    let d = (exp_f32((z[y] - m) - log_s) * k - sw * wy) - (1.0 - eps) * wy;
    g[y] = if cap { d * dz[y] * scale } else { d * f };
}

/// One row with options: the logits transformed into `z` (scale, softcap) in the read
/// that takes the statistics, then the weighted, smoothed loss with z-loss, and its
/// gradient through the transform.
#[inline(always)]
fn process_row_with_options<const F: bool>(
    row: &[f32],
    target: i32,
    out: Option<&mut [f32]>,
    o: &RowOpts<'_>,
    sc: &mut Scratch,
) -> (f32, f32) {
    let v = row.len();
    let (m, s, smooth) = options_stats::<F>(row, o, sc, out.is_some() && o.cap.is_some(), o.eps > 0.0);
    let log_s = s.ln() as f32;
    let lse = m + log_s;
    if target == Batch::IGNORED {
        if let Some(g) = out {
            g.fill(0.0);
        }
        return (0.0, lse);
    }
    let z: &[f32] = if o.transforms() { &sc.z } else { row };
    let y = target as usize;
    let (eps, wy) = (o.eps, o.weight(y));
    let mut loss = f64::from((1.0 - eps) * wy) * f64::from((m - z[y]) + log_s);
    if eps > 0.0 {
        // Σ_c w_c (lse − z_c) = Σ_c w_c (m − z_c) + W log s: non-negative terms (for
        // non-negative weights), so no cancellation.
        loss += f64::from(eps) / v as f64 * (smooth + o.total_weight * f64::from(log_s));
    }
    if o.z_loss > 0.0 {
        loss += f64::from(o.z_loss) * f64::from(lse) * f64::from(lse);
    }
    if let Some(g) = out {
        options_grad::<F>(z, &sc.dz, g, y, (m, log_s), lse, o.scale, o, false);
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

multiversion! {
    /// One batch of rows: the plain row loop, or the one with options.
    fn rows(
        logits: &[f32],
        v: usize,
        targets: &[i32],
        grad: Option<&mut [f32]>,
        loss: &mut [f32],
        lse: &mut [f32],
        o: &RowOpts<'_>,
        sc: &mut Scratch,
    ) {
        let rows = logits.chunks_exact(v).zip(targets).zip(loss.iter_mut().zip(lse.iter_mut()));
        match (grad, o.plain) {
            (Some(g), true) => {
                for (((row, &t), (l, e)), out) in rows.zip(g.chunks_exact_mut(v)) {
                    (*l, *e) = process_row(row, t, o.scale, Some(out));
                }
            }
            (None, true) => {
                for ((row, &t), (l, e)) in rows {
                    (*l, *e) = process_row(row, t, o.scale, None);
                }
            }
            (Some(g), false) => {
                for (((row, &t), (l, e)), out) in rows.zip(g.chunks_exact_mut(v)) {
                    (*l, *e) = process_row_with_options::<F>(row, t, Some(out), o, sc);
                }
            }
            (None, false) => {
                for ((row, &t), (l, e)) in rows {
                    (*l, *e) = process_row_with_options::<F>(row, t, None, o, sc);
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
                transform_row::<F>(row, o, sc);
                &sc.z
            } else {
                row
            };
            let l = lse[r];
            let scale = o.scale * upstream.of_row(first + r);
            options_grad::<F>(z, &sc.dz, g, t as usize, (l, 0.0), l, scale, o, true);
        }
    }
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
    let tasks = logits
        .par_chunks(step * v)
        .zip(batch.targets.par_chunks(step))
        .zip(loss.par_chunks_mut(step).zip(lse.par_chunks_mut(step)));
    match grad {
        Some(g) => tasks.zip(g.par_chunks_mut(step * v)).for_each(|(((l, t), (lo, ls)), g)| {
            rows(l, v, t, Some(g), lo, ls, &o, &mut Scratch::new(v, &o, true))
        }),
        None => tasks
            .for_each(|((l, t), (lo, ls))| rows(l, v, t, None, lo, ls, &o, &mut Scratch::new(v, &o, false))),
    }
    output(loss, lse, step, batch, opts)
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
    logits
        .par_chunks_mut(step * v)
        .zip(batch.targets.par_chunks(step))
        .zip(loss.par_chunks_mut(step).zip(lse.par_chunks_mut(step)))
        .for_each(|((l, t), (lo, ls))| {
            // One row at a time through a row-sized buffer, so the row is still intact
            // while its statistics are taken.
            let mut tmp = vec![0.0f32; v];
            let mut sc = Scratch::new(v, &o, true);
            for (r, row) in l.chunks_exact_mut(v).enumerate() {
                rows(row, v, &t[r..r + 1], Some(&mut tmp), &mut lo[r..r + 1], &mut ls[r..r + 1], &o, &mut sc);
                row.copy_from_slice(&tmp);
            }
        });
    Ok(output(loss, lse, step, &batch, opts))
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
            backward_rows(l, v, t, e, upstream, i * step, g, &o, &mut Scratch::new(v, &o, true))
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
    })
}

/// (Σ_c w_c t'_c, Σ_c w_c t'_c ((m − z_c) + log_s)) of a row of probability targets
/// `ts`, with `t' = (1−ε) t + ε/V`; terms whose weight `w_c t'_c` is 0 are left out (a
/// −inf logit with target 0 adds nothing). f32 lanes within each block of `BLOCK`, the
/// blocks added in f64.
#[inline(always)]
fn soft_sums<const W: bool>(
    z: &[f32],
    ts: &[f32],
    w: &[f32],
    (m, log_s): (f32, f32),
    eps: f32,
) -> (f64, f64) {
    let smooth = eps / z.len() as f32;
    let term = |zc: f32, tc: f32, wc: f32| {
        let t = (1.0 - eps) * tc + smooth;
        let wt = if W { wc * t } else { t };
        (wt, if wt != 0.0 { wt * ((m - zc) + log_s) } else { 0.0 })
    };
    let (mut a, mut b) = (0.0f64, 0.0f64);
    for (i, (zb, tb)) in z.chunks(BLOCK).zip(ts.chunks(BLOCK)).enumerate() {
        let wb = if W { &w[i * BLOCK..i * BLOCK + zb.len()] } else { zb };
        let (mut sa, mut sb) = ([0.0f32; LANES], [0.0f32; LANES]);
        let (zc, tc, wc) = (zb.chunks_exact(LANES), tb.chunks_exact(LANES), wb.chunks_exact(LANES));
        let (zr, tr, wr) = (zc.remainder(), tc.remainder(), wc.remainder());
        for ((zc, tc), wc) in zc.zip(tc).zip(wc) {
            for i in 0..LANES {
                let (x, y) = term(zc[i], tc[i], wc[i]);
                sa[i] += x;
                sb[i] += y;
            }
        }
        let (mut ra, mut rb) = (0.0f32, 0.0f32);
        for ((&zc, &tc), &wc) in zr.iter().zip(tr).zip(wr) {
            let (x, y) = term(zc, tc, wc);
            ra += x;
            rb += y;
        }
        a += f64::from(ra + sa.iter().sum::<f32>());
        b += f64::from(rb + sb.iter().sum::<f32>());
    }
    (a, b)
}

/// The gradient of a row of probability targets: `(p_c k − w_c t'_c) · dz_c · f`
/// (`C`: a softcap's `dz`, else `f` holds the logit scale).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn soft_grad<const F: bool, const W: bool, const C: bool>(
    z: &[f32],
    ts: &[f32],
    dz: &[f32],
    w: &[f32],
    g: &mut [f32],
    (m, log_s): (f32, f32),
    (k, eps): (f32, f32),
    f: f32,
) {
    let smooth = eps / z.len() as f32;
    let term = |zi: f32, ti: f32, wi: f32, di: f32| {
        let t = (1.0 - eps) * ti + smooth;
        let wt = if W { wi * t } else { t };
        let d = exp_neg::<F>((zi - m) - log_s) * k - wt;
        if C { d * di * f } else { d * f }
    };
    let n = z.len();
    let body = n - n % LANES;
    let chunks = z[..body].chunks_exact(LANES).zip(ts[..body].chunks_exact(LANES));
    for (j, ((zc, tc), gc)) in chunks.zip(g[..body].chunks_exact_mut(LANES)).enumerate() {
        let at = j * LANES;
        let wc = if W { &w[at..at + LANES] } else { zc };
        let dc = if C { &dz[at..at + LANES] } else { zc };
        for i in 0..LANES {
            gc[i] = term(zc[i], tc[i], wc[i], dc[i]);
        }
    }
    for c in body..n {
        g[c] = term(z[c], ts[c], if W { w[c] } else { 1.0 }, if C { dz[c] } else { 0.0 });
    }
}

multiversion! {
    /// One batch of rows with probability targets.
    fn soft_rows(
        logits: &[f32],
        targets: &[f32],
        v: usize,
        grad: Option<&mut [f32]>,
        loss: &mut [f32],
        lse: &mut [f32],
        o: &RowOpts<'_>,
        sc: &mut Scratch,
    ) {
        let want_grad = grad.is_some();
        let mut grad = grad.map(|g| g.chunks_exact_mut(v));
        for (r, (row, ts)) in logits.chunks_exact(v).zip(targets.chunks_exact(v)).enumerate() {
            let (m, s, _) = options_stats::<F>(row, o, sc, want_grad && o.cap.is_some(), false);
            let log_s = s.ln() as f32;
            let l = m + log_s;
            let z: &[f32] = if o.transforms() { &sc.z } else { row };
            let (a, b) = match o.weights {
                Some(w) => soft_sums::<true>(z, ts, w, (m, log_s), o.eps),
                None => soft_sums::<false>(z, ts, &[], (m, log_s), o.eps),
            };
            let mut row_loss = b;
            if o.z_loss > 0.0 {
                row_loss += f64::from(o.z_loss) * f64::from(l) * f64::from(l);
            }
            (loss[r], lse[r]) = (row_loss as f32, l);
            if let Some(g) = grad.as_mut().and_then(|g| g.next()) {
                let k = (a as f32 + 2.0 * o.z_grad * l, o.eps);
                let cap = o.cap.is_some();
                let f = if cap { o.scale } else { o.alpha * o.scale };
                let shift = (m, log_s);
                let dz = &sc.dz;
                match (o.weights, cap) {
                    (Some(w), true) => soft_grad::<F, true, true>(z, ts, dz, w, g, shift, k, f),
                    (Some(w), false) => soft_grad::<F, true, false>(z, ts, dz, w, g, shift, k, f),
                    (None, true) => soft_grad::<F, false, true>(z, ts, dz, &[], g, shift, k, f),
                    (None, false) => soft_grad::<F, false, false>(z, ts, dz, &[], g, shift, k, f),
                }
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
    let tasks = logits
        .par_chunks(step * v)
        .zip(targets.par_chunks(step * v))
        .zip(losses.par_chunks_mut(step).zip(lses.par_chunks_mut(step)));
    if want_grad {
        tasks.zip(grad.par_chunks_mut(step * v)).for_each(|(((x, t), (lo, ls)), g)| {
            soft_rows(x, t, v, Some(g), lo, ls, &o, &mut Scratch::new(v, &o, true))
        });
    } else {
        tasks.for_each(|((x, t), (lo, ls))| {
            soft_rows(x, t, v, None, lo, ls, &o, &mut Scratch::new(v, &o, false))
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
    })
}

/// Half-precision logits (raw f16 or bf16 bits) on the CPU: widened to f32 in parallel,
/// then the fast path; the gradient, when asked, is f32 (round it with
/// [`crate::HalfFormat::from_f32`] for the logits' format).
pub fn cross_entropy_half<'t>(
    logits: &[u16],
    format: crate::HalfFormat,
    classes: usize,
    targets: impl Into<Targets<'t>>,
    opts: &LossOptions,
) -> Result<LossOutput> {
    let mut wide = vec![0.0f32; logits.len()];
    wide.par_chunks_mut(1 << 16).zip(logits.par_chunks(1 << 16)).for_each(|(w, h)| {
        w.iter_mut().zip(h).for_each(|(w, &h)| *w = format.to_f32(h));
    });
    cross_entropy(&wide, classes, targets, opts)
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

    /// tanh within 3.5 ULP (and 2.5e-7 relative) and 1 − tanh² within 4e-7 relative,
    /// with and without FMA, over [−20, 20] and tiny arguments; the edges exact.
    #[test]
    fn tanh_and_its_derivative_are_accurate_everywhere() {
        fn check<const F: bool>() {
            let (mut worst_ulp, mut worst_rel, mut worst_s2) = (0.0f64, 0.0f64, 0.0f64);
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
                    worst_s2 = worst_s2.max((f64::from(s2) - want_s2).abs() / want_s2);
                }
            }
            assert!(
                worst_ulp < 3.5 && worst_rel < 2.5e-7,
                "fma {F}: tanh {worst_ulp} ULP, {worst_rel} relative"
            );
            assert!(worst_s2 < 4e-7, "fma {F}: 1 − tanh² relative error {worst_s2}");
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
                    crate::check::compare(&got, &want, tol)
                        .unwrap_or_else(|e| panic!("{opts:?} grad {grad} soft {soft}: {e}"));
                    assert_eq!(got.z_loss.is_some(), want.z_loss.is_some(), "{opts:?}");
                    let one = pool(1).install(|| run(&crate::CpuFast));
                    let two = pool(2).install(|| run(&crate::CpuFast));
                    assert_eq!(one, two, "{opts:?}: the thread count changed the result");
                }
            }
        }
    }
}
