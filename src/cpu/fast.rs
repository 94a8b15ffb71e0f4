//! The fast CPU path: fused, multi-threaded over rows (rayon), with an f32 polynomial
//! `exp` that the compiler vectorises (AVX2+FMA when the CPU has it, picked at run time).
//!
//! Per row: one read for the max and the sum together (an online softmax over blocks of
//! `BLOCK` elements: the block's max, one rescale of the running sum when it grows,
//! then `exp(x − max)` summed in f32 lanes and added to an f64 total, so long rows never
//! form one long f32 chain); and, for the gradient, one more read and one write. Same
//! options and results as [`crate::cpu::reference`].

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
    let shift = m + log_s;
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
    let _ = shift;
    // p − 1 for the target, computed from p before scaling, in f32.
    out[target] = (exp_f32((row[target] - m) - log_s) - 1.0) * scale;
}

/// The non-plain options of a call, in the form the row loop uses.
struct RowOpts<'a> {
    /// Gradient scale: upstream gradient over the `mean` denominator.
    scale: f32,
    plain: bool,
    eps: f32,
    z_loss: f32,
    alpha: f32,
    cap: Option<f32>,
    weights: Option<&'a [f32]>,
    total_weight: f32,
}

impl<'a> RowOpts<'a> {
    fn new(opts: &'a LossOptions, classes: usize, scale: f32) -> Self {
        let weights = opts.get_weights();
        Self {
            scale,
            plain: opts.is_plain(),
            eps: opts.get_label_smoothing() as f32,
            z_loss: opts.get_z_loss() as f32,
            alpha: opts.get_logit_scale() as f32,
            cap: opts.get_softcap().map(|c| c as f32),
            weights,
            total_weight: weights.map_or(classes as f64, |w| w.iter().map(|&x| f64::from(x)).sum()) as f32,
        }
    }
    #[inline(always)]
    fn weight(&self, c: usize) -> f32 {
        self.weights.map_or(1.0, |w| w[c])
    }
}

/// tanh through the vectorised exp, as the kernels compute it: an odd series for
/// |u| < 0.4 (where 1 − exp would cancel) and sign(u) (1 − e) / (1 + e) with
/// e = exp(−2|u|) elsewhere; ±1 at ±inf, NaN for NaN. Also returns 1 − tanh², as
/// 4e / (1 + e)² away from 0 (no cancellation near |tanh| = 1).
#[inline(always)]
fn tanh_sech2(u: f32) -> (f32, f32) {
    let u2 = u * u;
    let series = u
        * (1.0
            + u2 * (-1.0 / 3.0
                + u2 * (2.0 / 15.0
                    + u2 * (-17.0 / 315.0
                        + u2 * (62.0 / 2835.0 + u2 * (-1382.0 / 155925.0 + u2 * (21844.0 / 6081075.0)))))));
    let e = exp_f32(-2.0 * u.abs());
    let far = (1.0 - e) / (1.0 + e);
    let far = if u < 0.0 { -far } else { far };
    let far = if u.is_nan() { u } else { far };
    if u.abs() < 0.4 { (series, 1.0 - series * series) } else { (far, 4.0 * e / ((1.0 + e) * (1.0 + e))) }
}

/// One row with options: the logits transformed into `z` (scale, softcap), then the
/// weighted, smoothed loss with z-loss, and its gradient through the transform.
#[inline(always)]
fn process_row_with_options(
    row: &[f32],
    target: i32,
    scale: f32,
    out: Option<&mut [f32]>,
    o: &RowOpts<'_>,
    z: &mut [f32],
) -> (f32, f32) {
    let v = row.len();
    match o.cap {
        Some(cap) => z.iter_mut().zip(row).for_each(|(z, &x)| *z = cap * tanh_sech2(o.alpha * x / cap).0),
        None => z.iter_mut().zip(row).for_each(|(z, &x)| *z = o.alpha * x),
    }
    let (m, s) = row_stats(z);
    let log_s = s.ln() as f32;
    let lse = m + log_s;
    if target == Batch::IGNORED {
        if let Some(g) = out {
            g.fill(0.0);
        }
        return (0.0, lse);
    }
    let y = target as usize;
    let (eps, wy) = (o.eps, o.weight(y));
    let mut loss = f64::from((1.0 - eps) * wy) * f64::from((m - z[y]) + log_s);
    if eps > 0.0 {
        // Σ_c w_c (lse − z_c), each term formed as (m − z_c) + log s, summed in f64.
        let smooth: f64 = (0..v).map(|c| f64::from(o.weight(c)) * f64::from((m - z[c]) + log_s)).sum();
        loss += f64::from(eps) / v as f64 * smooth;
    }
    if o.z_loss > 0.0 {
        loss += f64::from(o.z_loss) * f64::from(lse) * f64::from(lse);
    }
    if let Some(g) = out {
        let mut k = (1.0 - eps) * wy;
        if eps > 0.0 {
            k += eps / v as f32 * o.total_weight;
        }
        if o.z_loss > 0.0 {
            k += 2.0 * o.z_loss * lse;
        }
        let smooth_w = eps / v as f32;
        for c in 0..v {
            let p = exp_f32((z[c] - m) - log_s);
            let dz = match o.cap {
                Some(cap) => o.alpha * tanh_sech2(o.alpha * row[c] / cap).1,
                None => o.alpha,
            };
            let mut d = p * k - smooth_w * o.weight(c);
            if c == y {
                d -= (1.0 - eps) * wy;
            }
            g[c] = d * dz * scale;
        }
    }
    (loss as f32, lse)
}

/// Everything about one row: loss, LSE, and its gradient if `out` is given.
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

/// One batch of rows, compiled twice: for AVX2+FMA and for the baseline.
macro_rules! rows_kernel {
    ($name:ident $(, #[$attr:meta])?) => {
        $(#[$attr])?
        fn $name(logits: &[f32], v: usize, targets: &[i32], grad: Option<&mut [f32]>, loss: &mut [f32], lse: &mut [f32], o: &RowOpts<'_>) {
            let scale = o.scale;
            if !o.plain {
                let mut z = vec![0.0f32; v];
                match grad {
                    Some(g) => {
                        for (r, ((row, out), &t)) in logits.chunks_exact(v).zip(g.chunks_exact_mut(v)).zip(targets).enumerate() {
                            (loss[r], lse[r]) = process_row_with_options(row, t, scale, Some(out), o, &mut z);
                        }
                    }
                    None => {
                        for (r, (row, &t)) in logits.chunks_exact(v).zip(targets).enumerate() {
                            (loss[r], lse[r]) = process_row_with_options(row, t, scale, None, o, &mut z);
                        }
                    }
                }
                return;
            }
            match grad {
                Some(g) => {
                    for (r, ((row, o), &t)) in logits.chunks_exact(v).zip(g.chunks_exact_mut(v)).zip(targets).enumerate() {
                        (loss[r], lse[r]) = process_row(row, t, scale, Some(o));
                    }
                }
                None => {
                    for (r, (row, &t)) in logits.chunks_exact(v).zip(targets).enumerate() {
                        (loss[r], lse[r]) = process_row(row, t, scale, None);
                    }
                }
            }
        }
    };
}

rows_kernel!(rows_baseline);
#[cfg(target_arch = "x86_64")]
rows_kernel!(rows_avx2, #[target_feature(enable = "avx2,fma")]);
#[cfg(target_arch = "x86_64")]
rows_kernel!(rows_avx512, #[target_feature(enable = "avx512f,avx2,fma")]);

fn rows(
    logits: &[f32],
    v: usize,
    targets: &[i32],
    grad: Option<&mut [f32]>,
    loss: &mut [f32],
    lse: &mut [f32],
    o: &RowOpts<'_>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { rows_avx512(logits, v, targets, grad, loss, lse, o) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function was compiled for.
        return unsafe { rows_avx2(logits, v, targets, grad, loss, lse, o) };
    }
    rows_baseline(logits, v, targets, grad, loss, lse, o)
}

/// Rows per parallel task: about 256 KiB of logits, at least one row.
fn rows_per_task(v: usize) -> usize {
    ((1 << 16) / v.max(1)).max(1)
}

fn run(logits: &[f32], batch: &Batch, opts: &LossOptions, grad: Option<&mut [f32]>) -> LossOutput {
    let (n, v) = (batch.rows, batch.classes);
    let scale = batch.gradient_scale(opts.get_reduction());
    let mut loss = vec![0.0f32; n];
    let mut lse = vec![0.0f32; n];
    let step = rows_per_task(v);
    let o = RowOpts::new(opts, v, scale);
    let tasks = logits
        .par_chunks(step * v)
        .zip(batch.targets.par_chunks(step))
        .zip(loss.par_chunks_mut(step).zip(lse.par_chunks_mut(step)));
    match grad {
        Some(g) => tasks
            .zip(g.par_chunks_mut(step * v))
            .for_each(|(((l, t), (lo, ls)), g)| rows(l, v, t, Some(g), lo, ls, &o)),
        None => tasks.for_each(|((l, t), (lo, ls))| rows(l, v, t, None, lo, ls, &o)),
    }
    output(loss, lse, step, batch, opts)
}

/// The output from the row losses and LSEs. The reduction: per-task partial sums in f64,
/// added in a fixed order, so the result does not depend on the thread count.
fn output(loss: Vec<f32>, lse: Vec<f32>, step: usize, batch: &Batch, opts: &LossOptions) -> LossOutput {
    let total: f64 = loss.chunks(step).map(|c| c.iter().map(|&x| f64::from(x)).sum::<f64>()).sum();
    LossOutput {
        loss: batch.reduce(total, opts.get_reduction()),
        row_losses: opts.wants_row_losses().then_some(loss),
        lse: opts.wants_lse().then_some(lse),
        gradient: None,
        z_loss: None,
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
    let scale = batch.gradient_scale(opts.get_reduction());
    let mut loss = vec![0.0f32; n];
    let mut lse = vec![0.0f32; n];
    let step = rows_per_task(v);
    let o = RowOpts::new(opts, v, scale);
    logits
        .par_chunks_mut(step * v)
        .zip(batch.targets.par_chunks(step))
        .zip(loss.par_chunks_mut(step).zip(lse.par_chunks_mut(step)))
        .for_each(|((l, t), (lo, ls))| {
            // One row at a time through a row-sized buffer, so the row is still intact
            // while its statistics are taken.
            let mut tmp = vec![0.0f32; v];
            for (r, row) in l.chunks_exact_mut(v).enumerate() {
                rows(row, v, &t[r..r + 1], Some(&mut tmp), &mut lo[r..r + 1], &mut ls[r..r + 1], &o);
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
    let scale = batch.gradient_scale(opts.get_reduction());
    let o = RowOpts::new(opts, v, scale);
    let mut grad = vec![0.0f32; logits.len()];
    grad.par_chunks_mut(v).zip(logits.par_chunks(v)).enumerate().for_each(|(r, (g, row))| {
        let t = batch.targets[r];
        if t == Batch::IGNORED {
            return;
        }
        let (y, l) = (t as usize, lse[r]);
        let (eps, wy) = (o.eps, o.weight(y));
        let mut k = (1.0 - eps) * wy;
        if eps > 0.0 {
            k += eps / v as f32 * o.total_weight;
        }
        if o.z_loss > 0.0 {
            k += 2.0 * o.z_loss * l;
        }
        let s = o.scale * upstream.of_row(r);
        for c in 0..v {
            let (z, dz) = match o.cap {
                Some(cap) => {
                    let (t, sech2) = tanh_sech2(o.alpha * row[c] / cap);
                    (cap * t, o.alpha * sech2)
                }
                None => (o.alpha * row[c], o.alpha),
            };
            let mut d = exp_f32(z - l) * k - eps / v as f32 * o.weight(c);
            if c == y {
                d -= (1.0 - eps) * wy;
            }
            g[c] = d * dz * s;
        }
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

/// Cross-entropy with probability targets on the CPU (see
/// [`crate::cpu::reference::cross_entropy_soft`]): rows in parallel, the vectorised exp.
pub fn cross_entropy_soft(
    logits: &[f32],
    classes: usize,
    targets: &[f32],
    opts: &LossOptions,
) -> Result<LossOutput> {
    let (denom, rows) = crate::options::check_soft(logits.len(), targets.len(), classes, opts)?;
    let v = classes;
    let d = match opts.get_reduction() {
        Reduction::Mean => denom,
        _ => 1.0,
    };
    let o = RowOpts::new(opts, v, (1.0 / d) as f32);
    let want_grad = opts.wants_gradient();
    let mut losses = vec![0.0f32; rows];
    let mut lses = vec![0.0f32; rows];
    let mut grad = vec![0.0f32; if want_grad { logits.len() } else { 0 }];
    let row = |r: usize, g: Option<&mut [f32]>| -> (f32, f32) {
        let xs = &logits[r * v..(r + 1) * v];
        let ts = &targets[r * v..(r + 1) * v];
        let z: Vec<f32> = match o.cap {
            Some(cap) => xs.iter().map(|&x| cap * tanh_sech2(o.alpha * x / cap).0).collect(),
            None => xs.iter().map(|&x| o.alpha * x).collect(),
        };
        let (m, s) = row_stats(&z);
        let log_s = s.ln() as f32;
        let lse = m + log_s;
        let smooth = o.eps / v as f32;
        let t = |c: usize| (1.0 - o.eps) * ts[c] + smooth;
        let mut a = 0.0f64;
        let mut b = 0.0f64;
        for (c, &zc) in z.iter().enumerate() {
            let wt = o.weight(c) * t(c);
            a += f64::from(wt);
            if wt != 0.0 {
                b += f64::from(wt) * f64::from((m - zc) + log_s);
            }
        }
        let mut loss = b;
        if o.z_loss > 0.0 {
            loss += f64::from(o.z_loss) * f64::from(lse) * f64::from(lse);
        }
        if let Some(g) = g {
            let k = a as f32 + 2.0 * o.z_loss * lse;
            for c in 0..v {
                let dz = match o.cap {
                    Some(cap) => o.alpha * tanh_sech2(o.alpha * xs[c] / cap).1,
                    None => o.alpha,
                };
                g[c] = (exp_f32((z[c] - m) - log_s) * k - o.weight(c) * t(c)) * dz * o.scale;
            }
        }
        (loss as f32, lse)
    };
    if want_grad {
        grad.par_chunks_mut(v)
            .zip(losses.par_iter_mut().zip(lses.par_iter_mut()))
            .enumerate()
            .for_each(|(r, (g, (l, e)))| (*l, *e) = row(r, Some(g)));
    } else {
        losses
            .par_iter_mut()
            .zip(lses.par_iter_mut())
            .enumerate()
            .for_each(|(r, (l, e))| (*l, *e) = row(r, None));
    }
    let total: f64 = losses.iter().map(|&x| f64::from(x)).sum();
    Ok(LossOutput {
        loss: (opts.get_reduction() != Reduction::None).then(|| (total / d) as f32),
        row_losses: opts.wants_row_losses().then_some(losses),
        lse: opts.wants_lse().then_some(lses),
        gradient: want_grad.then_some(grad),
        z_loss: None,
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
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst}");
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
