// Fused log-softmax + cross-entropy (row_state.wgsl is prepended). Each row is
// handled by `threads_per_row` invocations (a power of two up to WG, chosen by the host from V), so a workgroup
// serves WG / threads_per_row rows: one row per workgroup for long rows, many short
// rows per workgroup for small vocabularies.
//
// Pass 1 reads the row once and keeps an online-softmax state (running max, rescaled
// sum) per invocation; the states are merged by a workgroup tree with `combine`, the
// same monoid as `RowState::combine` in src/row_state.rs. Pass 2, only when a gradient
// is asked for, reads the row again and writes `(softmax - onehot) * scale`, either to
// `grad` or over the logits. Loss only: 1 read. Loss + gradient: 2 reads + 1 write.

override WG: u32 = 256u;

const GRAD_NONE: u32 = 0u;
const GRAD_SEPARATE: u32 = 1u;
const GRAD_IN_PLACE: u32 = 2u;

struct Params {
    rows: u32,          // rows in this dispatch
    classes: u32,       // V
    row_base: u32,      // first row of this dispatch in `targets`, `row_loss`, `row_lse`
    groups_x: u32,      // x size of the (folded) 2D dispatch
    grad_scale: f32,    // upstream gradient / mean denominator
    grad_mode: u32,
    ignore_index: i32,
    threads_per_row: u32, // power of two, <= WG
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> row_lse: array<f32>;
@group(0) @binding(5) var<storage, read_write> grad: array<f32>;
// Weight of each row in the `mean` denominator: 1, or 0 for an ignored row.
@group(0) @binding(6) var<storage, read_write> row_weight: array<f32>;
// (max, log(sum)) of each row, for a later cross_entropy_backward.wgsl pass.
@group(0) @binding(7) var<storage, read_write> row_stats: array<vec2<f32>>;

var<workgroup> wg_max: array<f32, WG>;
var<workgroup> wg_sum: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tpr = params.threads_per_row;
    let lane = lid % tpr;
    let seg = lid - lane; // first invocation of this row's segment
    let r = (wid.y * params.groups_x + wid.x) * (WG / tpr) + lid / tpr;
    // Invocations past the last row still take part in the barriers below.
    let in_batch = r < params.rows;
    let v = params.classes;
    let base = r * v;

    var st = RowState(EMPTY_MAX, 0.0);
    if (in_batch) {
        for (var c = lane; c < v; c += tpr) {
            st = push(st, logits[base + c]);
        }
    }
    wg_max[lid] = st.max;
    wg_sum[lid] = st.sum;
    workgroupBarrier();
    for (var stride = tpr / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            let o = combine(RowState(wg_max[lid], wg_sum[lid]),
                            RowState(wg_max[lid + stride], wg_sum[lid + stride]));
            wg_max[lid] = o.max;
            wg_sum[lid] = o.sum;
        }
        workgroupBarrier();
    }
    let m = wg_max[seg];
    let log_s = log(wg_sum[seg]);

    var t = -1;
    if (in_batch) {
        t = targets[params.row_base + r];
    }
    // Out-of-range targets never reach here from the host API (checked before
    // dispatch); treating them as ignored keeps every index in bounds regardless.
    let ignored = t == params.ignore_index || t < 0 || u32(t) >= v;
    if (in_batch && lane == 0u) {
        var loss = 0.0;
        if (!ignored) {
            // (max - x_t) is exact for nearby values; adding log(sum) last keeps the
            // loss accurate under large offsets, where max + log(sum) would round.
            loss = (m - logits[base + u32(t)]) + log_s;
        }
        row_loss[params.row_base + r] = loss;
        row_lse[params.row_base + r] = m + log_s;
        row_weight[params.row_base + r] = select(1.0, 0.0, ignored);
        row_stats[params.row_base + r] = vec2<f32>(m, log_s);
    }
    if (params.grad_mode == GRAD_NONE) {
        return;
    }
    // Lane 0 has read x_t above; nobody overwrites the row before this barrier.
    workgroupBarrier();
    if (!in_batch) {
        return;
    }
    let scale = params.grad_scale;
    let tc = select(v, u32(t), !ignored);
    for (var c = lane; c < v; c += tpr) {
        var g = 0.0;
        if (!ignored) {
            var p = exp((logits[base + c] - m) - log_s);
            if (c == tc) {
                p = p - 1.0;
            }
            g = p * scale;
        }
        if (params.grad_mode == GRAD_IN_PLACE) {
            logits[base + c] = g;
        } else {
            grad[base + c] = g;
        }
    }
}
