// Binary (multilabel) cross-entropy with logits, elementwise over a flat piece of the
// [N, V] logits: loss w [(1 - y) x + (1 + (pw - 1) y) softplus(-x)] with
// softplus(-x) = max(-x, 0) + log(1 + exp(-|x|)), and the gradient
// w [(1 + (pw - 1) y) σ(x) - pw y] * scale. One read of logits and targets, one write of
// the gradient (and of the element losses for `none`); each workgroup adds its losses as
// a tree and writes one partial sum.

#import workgroup
#import workgroup_sum

// `flags`: write the gradient; write the element losses; multiply each gradient by
// upstream[i] (a backward of `none`).
const FLAG_GRAD: u32 = 1u;
const FLAG_LOSSES: u32 = 2u;
const FLAG_UPSTREAM: u32 = 4u;

struct Params {
    count: u32,         // elements in this piece
    col_start: u32,     // class of the piece's first element
    classes: u32,       // V
    groups_x: u32,
    scale: f32,         // gradient scale: 1 / denominator
    has_weights: u32,
    has_pos_weight: u32,
    flags: u32,         // FLAG_* above
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<f32>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;
@group(0) @binding(4) var<storage, read> pos_weight: array<f32>;
@group(0) @binding(5) var<storage, read_write> grad: array<f32>;
@group(0) @binding(6) var<storage, read_write> losses: array<f32>;
@group(0) @binding(7) var<storage, read_write> partials: array<f32>;
@group(0) @binding(8) var<storage, read> upstream: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = group_index(wid, params.groups_x);
    let first = group * WG * 4u;
    var acc = 0.0;
    for (var k = 0u; k < 4u; k++) {
        let i = first + k * WG + lid;
        if (i < params.count) {
            let x = logits[i];
            let y = targets[i];
            let c = (params.col_start + i) % params.classes;
            let w = select(1.0, weights[c], params.has_weights != 0u);
            let pw = select(1.0, pos_weight[c], params.has_pos_weight != 0u);
            let e = exp(-abs(x));
            let coef = 1.0 + (pw - 1.0) * y;
            let loss = w * ((1.0 - y) * x + coef * (max(-x, 0.0) + log(1.0 + e)));
            acc += loss;
            if ((params.flags & FLAG_LOSSES) != 0u) {
                losses[i] = loss;
            }
            if ((params.flags & FLAG_GRAD) != 0u) {
                // σ(x) from the same e: 1/(1+e) for x >= 0, e/(1+e) below.
                let sigma = select(e, 1.0, x >= 0.0) / (1.0 + e);
                var g = w * (coef * sigma - pw * y) * params.scale;
                if ((params.flags & FLAG_UPSTREAM) != 0u) {
                    g *= upstream[i];
                }
                grad[i] = g;
            }
        }
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u) {
        partials[group] = total;
    }
}
