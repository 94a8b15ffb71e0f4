// Partial online-softmax states of column blocks (row_state.wgsl is prepended), for
// rows split across several dispatches or workgroups: each workgroup reduces one
// (row, block) to (max, sum) and, if the row's target falls in the block, captures
// the target's logit. merge_partials.wgsl combines the blocks of a row.

override WG: u32 = 256u;

struct Params {
    rows: u32,          // rows in this dispatch
    row_stride: u32,    // elements between consecutive rows in `logits`
    cols: u32,          // columns of each row in this dispatch
    col_base: u32,      // global class index of column 0
    block_cols: u32,    // columns per workgroup
    blocks: u32,        // blocks per row in this dispatch
    row_base: u32,      // global row of row 0 (targets)
    groups_x: u32,
    out_base: u32,      // index in `partials` of (row 0, block 0)
    out_stride: u32,    // entries per row in `partials`
    ignore_index: i32,
    classes: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
// (max, sum, target logit, 1 if the target is in this block else 0)
@group(0) @binding(3) var<storage, read_write> partials: array<vec4<f32>>;

var<workgroup> wg_max: array<f32, WG>;
var<workgroup> wg_sum: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = wid.y * params.groups_x + wid.x;
    let r = g / params.blocks;
    if (r >= params.rows) {
        return;
    }
    let block = g % params.blocks;
    let first = block * params.block_cols;
    let last = min(first + params.block_cols, params.cols);
    let base = r * params.row_stride;
    var st = RowState(EMPTY_MAX, 0.0);
    for (var c = first + lid; c < last; c += WG) {
        st = push(st, logits[base + c]);
    }
    wg_max[lid] = st.max;
    wg_sum[lid] = st.sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            let o = combine(RowState(wg_max[lid], wg_sum[lid]),
                            RowState(wg_max[lid + stride], wg_sum[lid + stride]));
            wg_max[lid] = o.max;
            wg_sum[lid] = o.sum;
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let t = targets[params.row_base + r];
        var x_t = 0.0;
        var has_t = 0.0;
        let lo = params.col_base + first;
        let hi = params.col_base + last;
        if (t != params.ignore_index && t >= 0 && u32(t) < params.classes && u32(t) >= lo && u32(t) < hi) {
            x_t = logits[base + (u32(t) - params.col_base)];
            has_t = 1.0;
        }
        partials[params.out_base + r * params.out_stride + block] = vec4<f32>(wg_max[0], wg_sum[0], x_t, has_t);
    }
}
