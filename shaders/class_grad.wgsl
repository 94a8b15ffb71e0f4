// The class-index gradient of one element from its row's saved statistics
// (`#import class_grad`: cross_entropy_backward.wgsl, and the linear head's GEMM
// epilogue in gemm_epilogue.wgsl):
// `up · scale / norm · (p · k − (ε/V) w_c − (1 − ε) w_y δ_cy) · dz/dx`, with
// p = exp(z − max) / sum and z the transformed logit.

#import row_state
#import targets

// What every element of a row shares.
struct RowGrad {
    // Global class of the target; none (0xffffffff) for an ignored row.
    t_class: u32,
    ignored: bool,
    max: f32,
    inv_sum: f32,
    k: f32,
    target_w: f32,
    // The upstream gradient over the `mean` denominator.
    scale: f32,
}

// Row statistics are (max, sum) pairs rather than LSE: under large offsets max + log(sum)
// rounds in f32 and exp(x - lse) would lose digits, and GPUs may take log near 1 with an
// absolute error of 2^-21, which p = exp(z - max - log(sum)) would carry as a relative
// one. A saved LSE comes as (lse, 1). `w_y` is the target's class weight (1 without).
fn row_grad(o: LossOpts, t: i32, ignore_index: i32, w_y: f32, stats: vec2<f32>, scale: f32) -> RowGrad {
    let ignored = ignored_target(t, ignore_index, o.classes);
    return RowGrad(select(u32(t), 0xffffffffu, ignored), ignored, stats.x, 1.0 / stats.y,
        grad_k(o, stats.x, log(stats.y), w_y), (1.0 - o.eps) * w_y, scale);
}

// The gradient of class `c` with transformed logit and slope `zs` (transform_slope1) and
// class weight `w_c` (read by the caller only with label smoothing and class weights).
fn class_grad(r: RowGrad, o: LossOpts, zs: vec2<f32>, c: u32, w_c: f32) -> f32 {
    if (r.ignored) {
        return 0.0;
    }
    var d = exp(zs.x - r.max) * r.inv_sum * r.k;
    if (o.eps > 0.0) {
        d -= o.eps / f32(o.classes) * w_c;
    }
    if (c == r.t_class) {
        d -= r.target_w;
    }
    return d * zs.y * r.scale;
}
