// Gradient of cross-entropy from saved row statistics:
// `g_r * scale / norm[0] * (p * k - (ε/V) w - (1 - ε) w_y onehot) * dz/dx`, with
// p = exp(z - max) / sum and z the transformed logit, over a grid of (row, column
// block) workgroups, so that few long rows still fill the device. g_r is the upstream
// gradient of the row (`upstream`, when per_row) or 1.
// Reads each logit once and writes each gradient once, to `grad` or over the logits.
// The element's gradient is class_grad.wgsl's (row statistics as (max, sum) pairs; a
// saved LSE comes as (lse, 1)).

#import class_grad
#import grad_mode
#import workgroup

struct Params {
    rows: u32,          // rows in this dispatch
    row_stride: u32,    // elements between consecutive rows in `logits` / `grad`
    cols: u32,          // columns of each row in this dispatch (<= row_stride)
    col_base: u32,      // global class index of column 0 (target matching)
    block_cols: u32,    // columns per workgroup
    blocks: u32,        // column blocks per row
    row_base: u32,      // global row of row 0 in `targets` and `row_stats`
    groups_x: u32,      // x size of the (folded) 2D dispatch
    scale: f32,         // upstream gradient
    grad_mode: u32,
    ignore_index: i32,
    classes: u32,       // V: targets outside [0, V) are treated as ignored
    per_row: u32,       // 1: multiply row r by upstream[row_base + r]
    has_weights: u32,
    logit_scale: f32,
    softcap: f32,       // 0: none
    smoothing: f32,
    z_loss: f32,
    weight_total: f32,
    z_grad: f32,        // the z-loss scale of the gradient (see LossOpts)
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read> row_stats: array<vec2<f32>>;
// The `mean` denominator (1 for sum/none), possibly computed on the device, and the
// factor of z_grad (1, or the ratio of the two `mean` denominators reduced on the device).
@group(0) @binding(4) var<storage, read> norm: array<f32>;
@group(0) @binding(5) var<storage, read_write> grad: array<f32>;
@group(0) @binding(6) var<storage, read> weights: array<f32>;
@group(0) @binding(7) var<storage, read> upstream: array<f32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = group_index(wid, params.groups_x);
    let r = g / params.blocks;
    if (r >= params.rows) {
        return;
    }
    let first = (g % params.blocks) * params.block_cols;
    let last = min(first + params.block_cols, params.cols);
    let base = r * params.row_stride;
    let t = targets[params.row_base + r];
    let o = LossOpts(params.logit_scale, params.softcap, params.smoothing, params.z_loss,
                     params.z_grad * norm[1], params.weight_total, params.classes);
    let has_w = params.has_weights != 0u;
    var w_y = 1.0;
    if (has_w && !ignored_target(t, params.ignore_index, params.classes)) {
        w_y = weights[u32(t)];
    }
    var up = 1.0;
    if (params.per_row != 0u) {
        up = upstream[params.row_base + r];
    }
    let rg = row_grad(o, t, params.ignore_index, w_y, row_stats[params.row_base + r], up * params.scale / norm[0]);
    for (var c = first + lid; c < last; c += WG) {
        var w = 1.0;
        if (o.eps > 0.0 && has_w) {
            w = weights[params.col_base + c];
        }
        let g = class_grad(rg, o, transform_slope1(logits[base + c], o), params.col_base + c, w);
        if (params.grad_mode == GRAD_IN_PLACE) {
            logits[base + c] = g;
        } else {
            grad[base + c] = g;
        }
    }
}
