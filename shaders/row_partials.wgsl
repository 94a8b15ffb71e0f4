// Partial online-softmax states of column blocks, for rows split across several
// dispatches or workgroups: each workgroup reduces one (row, block) of transformed
// logits z to (max, sum), the smoothing sums (Σ w (max - z), Σ w) relative to the
// block's max, and, if the row's target falls in the block, the target's z. merge_partials.wgsl combines the blocks of a row.

#import part_tree
#import row_state
#import targets
#import workgroup

struct Params {
    rows: u32,          // rows in this dispatch
    row_stride: u32,    // elements between consecutive rows in `logits`
    cols: u32,          // columns of each row in this dispatch
    col_base: u32,      // global class index of column 0
    block_cols: u32,    // columns per workgroup
    blocks: u32,        // blocks per row in this dispatch
    row_base: u32,      // global row of row 0 (targets)
    groups_x: u32,
    out_base: u32,      // entry in `partials` of (row 0, block 0)
    out_stride: u32,    // entries per row in `partials`
    ignore_index: i32,
    classes: u32,
    has_weights: u32,
    logit_scale: f32,
    softcap: f32,       // 0: none
    smoothing: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
// Two vec4 per entry: (max, sum, target z, 1 if the target is in this block else 0)
// and (Σ w (max - z), Σ w, 0, 0).
@group(0) @binding(3) var<storage, read_write> partials: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> weights: array<f32>;

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
    let o = LossOpts(params.logit_scale, params.softcap, params.smoothing, 0.0, 0.0, 0.0, params.classes);
    let smoothing = o.eps > 0.0;
    let block = g % params.blocks;
    let first = block * params.block_cols;
    let last = min(first + params.block_cols, params.cols);
    let base = r * params.row_stride;
    var part = Part(RowState(EMPTY_MAX, 0.0), 0.0, 0.0);
    for (var c = first + lid; c < last; c += WG) {
        var w = 1.0;
        if (smoothing && params.has_weights != 0u) {
            w = weights[params.col_base + c];
        }
        part = push_part(part, transform1(logits[base + c], o), w, smoothing);
    }
    let merged = merge_parts(lid, lid, WG, part, true);
    if (lid == 0u) {
        let t = targets[params.row_base + r];
        var z_t = 0.0;
        var has_t = 0.0;
        let lo = params.col_base + first;
        let hi = params.col_base + last;
        if (!ignored_target(t, params.ignore_index, params.classes) && u32(t) >= lo && u32(t) < hi) {
            z_t = transform1(logits[base + (u32(t) - params.col_base)], o);
            has_t = 1.0;
        }
        let at = 2u * (params.out_base + r * params.out_stride + block);
        partials[at] = vec4<f32>(merged.st.max, merged.st.sum, z_t, has_t);
        partials[at + 1u] = vec4<f32>(merged.aux, merged.wsum, 0.0, 0.0);
    }
}
