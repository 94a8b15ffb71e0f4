// Combines the block states of each row written by row_partials.wgsl, in block order,
// into the row's loss (class weights, label smoothing, z-loss), LSE, mean weight and
// statistics, and with `metrics` the row's metric record (row_metrics.wgsl). One
// invocation per row; rows have few blocks.

#import row_metrics
#import row_state
#import targets
#import workgroup

struct Params {
    rows: u32,
    blocks: u32,        // blocks per row in `partials`
    row_base: u32,      // global row of row 0 (targets, outputs)
    groups_x: u32,
    classes: u32,
    ignore_index: i32,
    has_weights: u32,
    smoothing: f32,
    z_loss: f32,
    weight_total: f32,
    metrics: u32,       // 1: write each row's metric record
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> partials: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> row_lse: array<f32>;
@group(0) @binding(5) var<storage, read_write> row_weight: array<f32>;
@group(0) @binding(6) var<storage, read_write> row_stats: array<vec2<f32>>;
@group(0) @binding(7) var<storage, read> weights: array<f32>;
// Two vec4 per row (row_metrics.wgsl's record), with `metrics`.
@group(0) @binding(8) var<storage, read_write> row_metrics: array<vec4<u32>>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = group_index(wid, params.groups_x) * WG + lid;
    if (r >= params.rows) {
        return;
    }
    let o = LossOpts(1.0, 0.0, params.smoothing, params.z_loss, params.z_loss, params.weight_total, params.classes);
    let metrics = params.metrics != 0u;
    var acc = Part(RowState(EMPTY_MAX, 0.0), 0.0, 0.0);
    var seen = NO_SEEN;
    var z_t = 0.0;
    for (var b = 0u; b < params.blocks; b++) {
        let p = partials[3u * (r * params.blocks + b)];
        let q = partials[3u * (r * params.blocks + b) + 1u];
        if (metrics) {
            seen = combine_seen(acc.st, seen, RowState(p.x, p.y), seen_of(partials[3u * (r * params.blocks + b) + 2u]));
        }
        acc = combine_parts(acc, Part(RowState(p.x, p.y), q.x, q.y), o.eps > 0.0);
        if (p.w != 0.0) {
            z_t = p.z;
        }
    }
    let st = acc.st;
    let log_s = log(st.sum);
    let t = targets[params.row_base + r];
    let ignored = ignored_target(t, params.ignore_index, params.classes);
    var w_y = 1.0;
    if (params.has_weights != 0u && !ignored) {
        w_y = weights[u32(t)];
    }
    let row = params.row_base + r;
    row_loss[row] = select(row_loss_of(o, st.max, log_s, z_t, w_y, acc.aux), 0.0, ignored);
    row_lse[row] = st.max + log_s;
    row_weight[row] = select(w_y, 0.0, ignored);
    row_stats[row] = vec2<f32>(st.max, st.sum);
    if (metrics) {
        let record = metrics_record(st, seen, log_s, z_t, t, !ignored);
        row_metrics[2u * row] = record[0];
        row_metrics[2u * row + 1u] = record[1];
    }
}
