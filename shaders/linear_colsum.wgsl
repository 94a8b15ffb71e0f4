// The bias gradient of the linear head: db[db_base + i] (+)= Σ_r G[r, col_base + i] over
// the rows of one chunk of G [rows, cols] (db bound at its piece of classes), one invocation per column, rows summed in order (a fixed
// order: the same bits run to run, no atomics). The host accumulates over chunks in
// chunk order.

#import workgroup

struct Params {
    rows: u32,
    cols: u32,        // columns of G (its row stride) and of db
    groups_x: u32,
    accumulate: u32,  // 1: db += the sum, 0: db = the sum
    col_base: u32,    // first column of this dispatch
    count: u32,       // columns of this dispatch
    db_base: u32,     // entry of db for column col_base
    row_base: u32,    // first row of G summed by this dispatch (`rows` from it)
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> db: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, params.groups_x) * WG + lid;
    if (i >= params.count) {
        return;
    }
    let col = params.col_base + i;
    // Pairs of rows, then the pair into the total: no single chain of `rows` additions
    // with its rounding error growing linearly more than it must.
    // The host keeps `rows` within CPU adapters' 65535 loop iterations (COLSUM_ROWS).
    var total = 0.0;
    var r = params.row_base;
    let end = params.row_base + params.rows;
    for (; r + 1u < end; r += 2u) {
        total += g[r * params.cols + col] + g[(r + 1u) * params.cols + col];
    }
    if (r < end) {
        total += g[r * params.cols + col];
    }
    let at = params.db_base + i;
    if (params.accumulate != 0u) {
        total += db[at];
    }
    db[at] = total;
}
