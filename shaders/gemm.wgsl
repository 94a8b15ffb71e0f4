// Tiled matrix product C (+)= op(A) · op(B) (+ bias), the linear head's products
// (src/gpu/linear.rs): logits = h·Wᵀ (A row-major, B transposed), dh = G·W, dW = Gᵀ·h.
// The host composes it with a loader (gemm_load_vec4.wgsl: vec4 loads, every
// contiguous length, stride and offset a multiple of 4; gemm_load_f32.wgsl otherwise)
// that declares `a` (binding 1), `b` (binding 2) and `load_a4` / `load_b4`, and with
// the lanes (gemm_lanes_subgroup.wgsl where the device has subgroups,
// gemm_lanes_none.wgsl otherwise) that declare the entry points' builtins (`TileIds`).
//
// A workgroup of GX × GY invocations computes a BM × BN tile of C (BM = TR·GY,
// BN = 4·GX); each invocation keeps a TR × 4 register tile (TR vec4 accumulators, one
// per row). With TR = 4 the K dimension is walked in steps of BK: the A and B sub-tiles
// go through workgroup memory (or, with SHARED false, each invocation loads its own
// blocks), four values per load along each operand's contiguous dimension. With TR = 16
// (the broadcast tile, CPU adapters whose subgroups are 8 lanes, gemm_lanes_subgroup)
// the GX invocations of a workgroup row share their 16 rows: each lane loads one vec4 of
// A per 8 rows and the subgroup's broadcasts hand every lane all 16, so a lane's loads
// per K step are 2 of A and 4 of B for 256 multiply-adds.
// Out-of-range elements load as 0, so ragged edges need no other care. Every element of
// C is written by one invocation, summed over K in a fixed order: no atomics, the same
// bits run to run.

#import workgroup

// Workgroup shape and K step: pipeline constants chosen per adapter (`Tuning::gemm_*`).
override GX: u32 = 16u;
override GY: u32 = 16u;
// (WG of workgroup.wgsl is GX · GY here; the host sets it so.)
override BK: u32 = 16u;
// A(m, k) at a[a_off + k·lda + m] (contiguous along m) instead of a[a_off + m·lda + k].
override A_T: bool = false;
// B(k, n) at b[b_off + n·ldb + k] (contiguous along k) instead of b[b_off + k·ldb + n].
override B_T: bool = false;
// false: no workgroup tiles; each invocation reads its own 4 × 4 blocks of A and B (four
// vec4 loads each, transposed in registers where the layout runs the other way) and no
// barrier is needed. CPU adapters run a workgroup's invocations as SIMD lanes of one
// thread, where workgroup memory is memory like any other and a barrier switches
// between the lanes' batches (`GemmTuning::shared`).
override SHARED: bool = true;
// Rows per invocation: 4, or 16 for the broadcast tile (GX a multiple of the subgroup's
// 8 lanes, every lane of a subgroup in the same workgroup row; `GemmTuning::broadcast`).
override TR: u32 = 4u;

// Floats of workgroup memory per operand: BK · BM and BK · BN must fit (the host checks).
const TILE_FLOATS: u32 = 1024u;
const FLAG_ACCUMULATE: u32 = 1u;
const FLAG_BIAS: u32 = 2u;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,
    lda: u32,
    b_off: u32,
    ldb: u32,
    c_off: u32,
    ldc: u32,
    bias_off: u32,
    flags: u32,      // FLAG_*: C += (else C =); + bias[bias_off + n]
    groups_x: u32,   // x size of the (folded) 2D dispatch
    tiles_n: u32,    // tiles along n
    tile_base: u32,  // flat tile index of this dispatch's workgroup 0
    // The loss, for the epilogues of gemm_epilogue.wgsl (unread by `main`):
    col_base: u32,   // class of column 0 of C
    classes: u32,    // V
    ignore_index: i32,
    loss_flags: u32, // LOSS_*
    logit_scale: f32,
    softcap: f32,    // 0: none
    smoothing: f32,
    z_loss: f32,
    weight_total: f32,
    z_grad: f32,
    grad_scale: f32, // upstream gradient (over norm[0])
    out_base: u32,   // partials: block of this dispatch's column 0 in a row
    out_stride: u32, // partials: blocks per row
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

var<workgroup> sa: array<f32, TILE_FLOATS>; // [BK][BM]
var<workgroup> sb: array<f32, TILE_FLOATS>; // [BK][BN]

// Loads the BK × BM tile of A at (m0, k0) and the BK × BN tile of B at (k0, n0).
fn load_tiles(lid: u32, m0: u32, n0: u32, k0: u32) {
    let threads = GX * GY;
    let bm = 4u * GY;
    let bn = 4u * GX;
    let p = params;
    for (var i = lid; i < BK * bm / 4u; i += threads) {
        if (A_T) {
            let kk = i / (bm / 4u);
            let mm = 4u * (i % (bm / 4u));
            let k = k0 + kk;
            let m = m0 + mm;
            let count = select(0u, min(4u, p.m - min(m, p.m)), k < p.k);
            let v = load_a4(p.a_off + k * p.lda + m, count);
            sa[kk * bm + mm] = v.x;
            sa[kk * bm + mm + 1u] = v.y;
            sa[kk * bm + mm + 2u] = v.z;
            sa[kk * bm + mm + 3u] = v.w;
        } else {
            let mm = i / (BK / 4u);
            let kk = 4u * (i % (BK / 4u));
            let k = k0 + kk;
            let m = m0 + mm;
            let count = select(0u, min(4u, p.k - min(k, p.k)), m < p.m);
            let v = load_a4(p.a_off + m * p.lda + k, count);
            sa[kk * bm + mm] = v.x;
            sa[(kk + 1u) * bm + mm] = v.y;
            sa[(kk + 2u) * bm + mm] = v.z;
            sa[(kk + 3u) * bm + mm] = v.w;
        }
    }
    for (var i = lid; i < BK * bn / 4u; i += threads) {
        if (B_T) {
            let nn = i / (BK / 4u);
            let kk = 4u * (i % (BK / 4u));
            let k = k0 + kk;
            let n = n0 + nn;
            let count = select(0u, min(4u, p.k - min(k, p.k)), n < p.n);
            let v = load_b4(p.b_off + n * p.ldb + k, count);
            sb[kk * bn + nn] = v.x;
            sb[(kk + 1u) * bn + nn] = v.y;
            sb[(kk + 2u) * bn + nn] = v.z;
            sb[(kk + 3u) * bn + nn] = v.w;
        } else {
            let kk = i / (bn / 4u);
            let nn = 4u * (i % (bn / 4u));
            let k = k0 + kk;
            let n = n0 + nn;
            let count = select(0u, min(4u, p.n - min(n, p.n)), k < p.k);
            let v = load_b4(p.b_off + k * p.ldb + n, count);
            sb[kk * bn + nn] = v.x;
            sb[kk * bn + nn + 1u] = v.y;
            sb[kk * bn + nn + 2u] = v.z;
            sb[kk * bn + nn + 3u] = v.w;
        }
    }
}

// A(m..m+4, k..k+4) as four vec4 along m, one per k (0 out of range).
fn a_block(m: u32, k: u32) -> mat4x4<f32> {
    let p = params;
    if (A_T) {
        let count = min(4u, p.m - min(m, p.m));
        var cols: mat4x4<f32>;
        for (var j = 0u; j < 4u; j++) {
            cols[j] = load_a4(p.a_off + (k + j) * p.lda + m, select(0u, count, k + j < p.k));
        }
        return cols;
    }
    let count = min(4u, p.k - min(k, p.k));
    var rows: mat4x4<f32>;
    for (var i = 0u; i < 4u; i++) {
        rows[i] = load_a4(p.a_off + (m + i) * p.lda + k, select(0u, count, m + i < p.m));
    }
    return transpose(rows);
}

// B(k..k+4, n..n+4) as four vec4 along n, one per k (0 out of range).
fn b_block(k: u32, n: u32) -> mat4x4<f32> {
    let p = params;
    if (B_T) {
        let count = min(4u, p.k - min(k, p.k));
        var cols: mat4x4<f32>;
        for (var j = 0u; j < 4u; j++) {
            cols[j] = load_b4(p.b_off + (n + j) * p.ldb + k, select(0u, count, n + j < p.n));
        }
        return transpose(cols);
    }
    let count = min(4u, p.n - min(n, p.n));
    var rows: mat4x4<f32>;
    for (var j = 0u; j < 4u; j++) {
        rows[j] = load_b4(p.b_off + (k + j) * p.ldb + n, select(0u, count, k + j < p.k));
    }
    return rows;
}

// Row m, columns n..n+4 of C from one accumulator (in range only).
fn store_row(m: u32, n: u32, v: vec4<f32>) {
    if (m >= params.m) {
        return;
    }
    let accumulate = (params.flags & FLAG_ACCUMULATE) != 0u;
    let with_bias = (params.flags & FLAG_BIAS) != 0u;
    for (var j = 0u; j < 4u; j++) {
        if (n + j < params.n) {
            let at = params.c_off + m * params.ldc + n + j;
            var x = v[j];
            if (with_bias) {
                x += bias[params.bias_off + n + j];
            }
            if (accumulate) {
                x += c[at];
            }
            c[at] = x;
        }
    }
}

// One workgroup's tile of the product: its TR × 4 register tile at (row, col), rows
// row..row+TR-1 in lo, hi (see `tile_acc`). `valid` is uniform per workgroup (false past
// the last tile).
struct Tile {
    valid: bool,
    m0: u32,
    n0: u32,
    row: u32,
    col: u32,
    // Rows row..row+7, and row+8..row+15 for TR = 16 (0 otherwise).
    lo: Lanes8,
    hi: Lanes8,
}

// Row t.row + slot's accumulator (slot < TR).
fn tile_acc(t: Tile, slot: u32) -> vec4<f32> {
    var r = t.lo;
    if (slot >= 8u) {
        r = t.hi;
    }
    switch slot % 8u {
        case 0u: { return r.l0; }
        case 1u: { return r.l1; }
        case 2u: { return r.l2; }
        case 3u: { return r.l3; }
        case 4u: { return r.l4; }
        case 5u: { return r.l5; }
        case 6u: { return r.l6; }
        default: { return r.l7; }
    }
}

// Eight vec4 values: eight lanes' (gemm_lanes_*.wgsl), or eight rows' accumulators.
struct Lanes8 {
    l0: vec4<f32>,
    l1: vec4<f32>,
    l2: vec4<f32>,
    l3: vec4<f32>,
    l4: vec4<f32>,
    l5: vec4<f32>,
    l6: vec4<f32>,
    l7: vec4<f32>,
}

// acc + B · r for eight rows: bb[j] = B(k + j, col..col+3), r.li = A(row i, k..k+3).
fn mad8(acc: Lanes8, bb: mat4x4<f32>, r: Lanes8) -> Lanes8 {
    return Lanes8(acc.l0 + bb * r.l0, acc.l1 + bb * r.l1, acc.l2 + bb * r.l2, acc.l3 + bb * r.l3,
        acc.l4 + bb * r.l4, acc.l5 + bb * r.l5, acc.l6 + bb * r.l6, acc.l7 + bb * r.l7);
}

// This lane's vec4 of A for the broadcast tile's 8 rows from `row`: with A(m, k)
// contiguous along k, row + lane at k..k+3; along m (A_T), rows row + 4·(lane / 4) ..+3
// at k + lane % 4.
fn a_lane(row: u32, k: u32, lane: u32) -> vec4<f32> {
    let p = params;
    if (A_T) {
        let m = row + 4u * (lane / 4u);
        let kk = k + lane % 4u;
        return load_a4(p.a_off + kk * p.lda + m, select(0u, min(4u, p.m - min(m, p.m)), kk < p.k));
    }
    let m = row + lane;
    return load_a4(p.a_off + m * p.lda + k, select(0u, min(4u, p.k - min(k, p.k)), m < p.m));
}

// The 8 rows' A(row + i, k..k+3) from the lanes' `a_lane` values.
fn lane_rows(l: Lanes8) -> Lanes8 {
    if (A_T) {
        let lo = transpose(mat4x4<f32>(l.l0, l.l1, l.l2, l.l3));
        let hi = transpose(mat4x4<f32>(l.l4, l.l5, l.l6, l.l7));
        return Lanes8(lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]);
    }
    return l;
}

fn tile_product(ids: TileIds) -> Tile {
    let wid = ids.wid;
    let lid = ids.lid;
    let bm = TR * GY;
    let bn = 4u * GX;
    let tiles_m = (params.m + bm - 1u) / bm;
    let g = params.tile_base + group_index(wid, params.groups_x);
    let tm = g % tiles_m;
    let m0 = tm * bm;
    let n0 = (g / tiles_m) * bn;
    let tx = ids.lid3.x;
    let ty = ids.lid3.y;
    // Four named accumulators, not an array: a private array indexed at run time would
    // live in memory on CPU adapters (every FMA a load and a store).
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    let zero = vec4<f32>(0.0);
    var lo = Lanes8(zero, zero, zero, zero, zero, zero, zero, zero);
    var hi = lo;
    // Uniform per workgroup: the barriers and broadcasts below stay in uniform control
    // flow.
    let valid = g / tiles_m < params.tiles_n;
    if (valid && TR == 16u) {
        let row = m0 + 16u * ty;
        let col = n0 + 4u * tx;
        let lane = lane_of(ids);
        for (var k = 0u; k < params.k; k += 4u) {
            let bb = b_block(k, col);
            lo = mad8(lo, bb, lane_rows(lanes8(a_lane(row, k, lane))));
            hi = mad8(hi, bb, lane_rows(lanes8(a_lane(row + 8u, k, lane))));
        }
    }
    if (valid && TR == 4u && !SHARED) {
        let row = m0 + 4u * ty;
        let col = n0 + 4u * tx;
        for (var k = 0u; k < params.k; k += 4u) {
            let ab = a_block(row, k);
            let bb = b_block(k, col);
            for (var kk = 0u; kk < 4u; kk++) {
                let av = ab[kk];
                let bv = bb[kk];
                acc0 += av.x * bv;
                acc1 += av.y * bv;
                acc2 += av.z * bv;
                acc3 += av.w * bv;
            }
        }
    }
    if (valid && TR == 4u && SHARED) {
        for (var k0 = 0u; k0 < params.k; k0 += BK) {
            load_tiles(lid, m0, n0, k0);
            workgroupBarrier();
            for (var kk = 0u; kk < BK; kk++) {
                let ai = kk * bm + 4u * ty;
                let bi = kk * bn + 4u * tx;
                let bv = vec4<f32>(sb[bi], sb[bi + 1u], sb[bi + 2u], sb[bi + 3u]);
                acc0 += sa[ai] * bv;
                acc1 += sa[ai + 1u] * bv;
                acc2 += sa[ai + 2u] * bv;
                acc3 += sa[ai + 3u] * bv;
            }
            workgroupBarrier();
        }
    }
    if (TR == 4u) {
        lo = Lanes8(acc0, acc1, acc2, acc3, zero, zero, zero, zero);
    }
    return Tile(valid, m0, n0, m0 + TR * ty, n0 + 4u * tx, lo, hi);
}

@compute @workgroup_size(GX, GY)
fn main(ids: TileIds) {
    let t = tile_product(ids);
    if (!t.valid) {
        return;
    }
    for (var slot = 0u; slot < TR; slot++) {
        store_row(t.row + slot, t.col, tile_acc(t, slot));
    }
}
