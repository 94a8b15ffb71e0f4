// Partial online-softmax states of column blocks, for rows split across several
// dispatches or workgroups: each workgroup reduces one (row, block) of transformed
// logits z to (max, sum), the smoothing sums (Σ w (max - z), Σ w) relative to the
// block's max, and, if the row's target falls in the block, the target's z. With
// `metrics`, also the block's metrics (`Seen`, row_metrics.wgsl) against the target's z:
// read from the bound columns when the target is among them, else from the partial
// entry `zt_entry` of an earlier dispatch (the host sends the target's piece of a split
// row first). merge_partials.wgsl combines the blocks of a row.

#import part_tree
#import row_metrics
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
    metrics: u32,       // 1: the metrics' parts too
    zt_entry: u32,      // entry holding the target's z when it is not bound (NO_ARG: bound)
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
// Three vec4 per entry: (max, sum, target z, 1 if the target is in this block else 0),
// (Σ w (max - z), Σ w, 0, 0) and the metrics' parts (`seen_vec`).
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
    let metrics = params.metrics != 0u;
    let t = targets[params.row_base + r];
    let counted = !ignored_target(t, params.ignore_index, params.classes);
    // The target's z for the count above it (nothing is above FLT_MAX).
    var z_m = FLT_MAX;
    if (metrics && counted) {
        let tc = u32(t);
        if (tc >= params.col_base && tc < params.col_base + params.cols) {
            z_m = transform1(logits[base + (tc - params.col_base)], o);
        } else if (params.zt_entry != NO_ARG) {
            z_m = partials[3u * (params.zt_entry + r * params.out_stride)].z;
        }
    }
    var part = Part(RowState(EMPTY_MAX, 0.0), 0.0, 0.0);
    var seen = NO_SEEN;
    for (var c = first + lid; c < last; c += WG) {
        var w = 1.0;
        if (smoothing && params.has_weights != 0u) {
            w = weights[params.col_base + c];
        }
        let z = transform1(logits[base + c], o);
        if (metrics) {
            seen = push_seen(part.st, seen, z, params.col_base + c, z_m);
        }
        part = push_part(part, z, w, smoothing);
    }
    let all = merge_parts_seen(lid, lid, WG, Merged(part, seen), true, metrics);
    let merged = all.part;
    if (lid == 0u) {
        var z_t = 0.0;
        var has_t = 0.0;
        let lo = params.col_base + first;
        let hi = params.col_base + last;
        if (!ignored_target(t, params.ignore_index, params.classes) && u32(t) >= lo && u32(t) < hi) {
            z_t = transform1(logits[base + (u32(t) - params.col_base)], o);
            has_t = 1.0;
        }
        let at = 3u * (params.out_base + r * params.out_stride + block);
        partials[at] = vec4<f32>(merged.st.max, merged.st.sum, z_t, has_t);
        partials[at + 1u] = vec4<f32>(merged.aux, merged.wsum, 0.0, 0.0);
        partials[at + 2u] = seen_vec(all.seen);
    }
}
