// The linear head's target logits, for the evaluation metrics of its `partials` epilogue
// (gemm_epilogue.wgsl), which counts each row's logits above its target's before the
// tile holding the target has been seen: z_t = transform(h_m · W_t (+ b_t)) for every
// chunk row m whose target class t lies in this dispatch's piece of W (W and b bound at
// the piece), summed over k in order as the tile product sums it. An ignored row gets
// FLT_MAX (nothing is above it), written by the dispatch of piece 0. One invocation per
// row; D is at most GEMM_MAX_K, within CPU adapters' loop limit.

#import row_metrics
#import row_state
#import targets
#import workgroup

struct Params {
    rows: u32,          // rows of the chunk
    dim: u32,           // D
    col_base: u32,      // class of the piece's first row of W
    count: u32,         // classes in the piece
    classes: u32,       // V
    ignore_index: i32,
    has_bias: u32,
    groups_x: u32,
    logit_scale: f32,
    softcap: f32,       // 0: none
    first_piece: u32,   // 1: this dispatch writes the ignored rows
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> h: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read> targets: array<i32>;
@group(0) @binding(5) var<storage, read_write> target_logit: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m = group_index(wid, params.groups_x) * WG + lid;
    if (m >= params.rows) {
        return;
    }
    let t = targets[m];
    if (ignored_target(t, params.ignore_index, params.classes)) {
        if (params.first_piece != 0u) {
            target_logit[m] = FLT_MAX;
        }
        return;
    }
    let tc = u32(t);
    if (tc < params.col_base || tc - params.col_base >= params.count) {
        return;
    }
    let row = tc - params.col_base;
    var acc = 0.0;
    for (var k = 0u; k < params.dim; k++) {
        acc += h[m * params.dim + k] * w[row * params.dim + k];
    }
    if (params.has_bias != 0u) {
        acc += bias[row];
    }
    let o = LossOpts(params.logit_scale, params.softcap, 0.0, 0.0, 0.0, 0.0, params.classes);
    target_logit[m] = transform1(acc, o);
}
