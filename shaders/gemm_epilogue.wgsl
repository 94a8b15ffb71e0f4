// The linear head's epilogues of gemm.wgsl: entry points beside its `main`, over the
// same tile product, so that the tile of logits x = h Wᵀ + b never goes to memory
// (src/gpu/linear.rs):
// - `partials`: each row's online-softmax part over the tile's columns, in
//   merge_partials.wgsl's entries ((max, sum, target z, 1 if the target is here),
//   (Σ w (max − z), Σ w, 0, 0)), the GX invocations of a row combined in order;
//   merge_partials.wgsl then combines a row's blocks (tiles) into its loss and statistics.
// - `grad`: G = ∂loss/∂x from the rows' statistics (class_grad.wgsl), written to C, for
//   the products dh = G W, dW = Gᵀ h.
// C's rows, the targets, statistics and upstream gradients are the chunk's (row 0 first);
// `col_base` is the class of C's column 0.

#import class_grad

const LOSS_WEIGHTS: u32 = 1u;
const LOSS_PER_ROW: u32 = 2u;

@group(0) @binding(5) var<storage, read> targets: array<i32>;
@group(0) @binding(6) var<storage, read> weights: array<f32>;
@group(0) @binding(7) var<storage, read> row_stats: array<vec2<f32>>;
@group(0) @binding(8) var<storage, read> upstream: array<f32>;

// The head's denominators come from the host: grad_scale and z_grad are final.
fn head_opts() -> LossOpts {
    return LossOpts(params.logit_scale, params.softcap, params.smoothing, params.z_loss,
        params.z_grad, params.weight_total, params.classes);
}

// The logit at column n of C from the product's value there.
fn head_logit(v: f32, n: u32) -> f32 {
    if ((params.flags & FLAG_BIAS) != 0u) {
        return v + bias[params.bias_off + n];
    }
    return v;
}

// The class weight of column n where the class's own weight matters (label smoothing);
// 1 elsewhere, unread.
fn smoothing_weight(n: u32, o: LossOpts) -> f32 {
    if (o.eps > 0.0 && (params.loss_flags & LOSS_WEIGHTS) != 0u) {
        return weights[params.col_base + n];
    }
    return 1.0;
}

// The target's class of chunk row m, or none (0xffffffff).
fn target_class(m: u32) -> u32 {
    let t = targets[m];
    return select(u32(t), 0xffffffffu, ignored_target(t, params.ignore_index, params.classes));
}

struct RowPart {
    part: Part,
    z_t: f32,
    has_t: f32,
}

// This invocation's part of row m over its columns n..n+3 (product values v).
fn row_part(m: u32, n: u32, v: vec4<f32>, o: LossOpts) -> RowPart {
    var r = RowPart(Part(RowState(EMPTY_MAX, 0.0), 0.0, 0.0), 0.0, 0.0);
    if (m >= params.m) {
        return r;
    }
    let t_class = target_class(m);
    for (var j = 0u; j < 4u; j++) {
        if (n + j < params.n) {
            let z = transform1(head_logit(v[j], n + j), o);
            r.part = push_part(r.part, z, smoothing_weight(n + j, o), o.eps > 0.0);
            if (params.col_base + n + j == t_class) {
                r.z_t = z;
                r.has_t = 1.0;
            }
        }
    }
    return r;
}

// Combines row t.row + slot's parts over the GX invocations of each workgroup row, in
// order, and writes the tile's entry. The operand tiles are free once the product is
// done: they hold the parts (4 · GX · GY <= TILE_FLOATS, checked by the host).
fn write_part(ids: TileIds, t: Tile, slot: u32, r: RowPart, smoothing: bool) {
    let lid = ids.lid;
    sa[4u * lid] = r.part.st.max;
    sa[4u * lid + 1u] = r.part.st.sum;
    sa[4u * lid + 2u] = r.part.aux;
    sa[4u * lid + 3u] = r.part.wsum;
    sb[2u * lid] = r.z_t;
    sb[2u * lid + 1u] = r.has_t;
    workgroupBarrier();
    let m = t.row + slot;
    if (ids.lid3.x == 0u && m < params.m) {
        var acc = Part(RowState(EMPTY_MAX, 0.0), 0.0, 0.0);
        var z_t = 0.0;
        var has_t = 0.0;
        // lid is the first invocation of this workgroup row (tx = 0).
        for (var x = 0u; x < GX; x++) {
            let i = lid + x;
            acc = combine_parts(acc, Part(RowState(sa[4u * i], sa[4u * i + 1u]), sa[4u * i + 2u], sa[4u * i + 3u]), smoothing);
            if (sb[2u * i + 1u] != 0.0) {
                z_t = sb[2u * i];
                has_t = 1.0;
            }
        }
        let at = 12u * (m * params.out_stride + params.out_base + t.n0 / (4u * GX));
        c[at] = acc.st.max;
        c[at + 1u] = acc.st.sum;
        c[at + 2u] = z_t;
        c[at + 3u] = has_t;
        c[at + 4u] = acc.aux;
        c[at + 5u] = acc.wsum;
        c[at + 6u] = 0.0;
        c[at + 7u] = 0.0;
        // merge_partials' metrics parts: none here (the head's metrics take whole rows).
        for (var k = 8u; k < 12u; k++) {
            c[at + k] = 0.0;
        }
    }
    // The next slot reuses the tiles.
    workgroupBarrier();
}

@compute @workgroup_size(GX, GY)
fn partials(ids: TileIds) {
    let t = tile_product(ids);
    if (!t.valid) {
        return;
    }
    let o = head_opts();
    let smoothing = o.eps > 0.0;
    write_part(ids, t, 0u, row_part(t.row, t.col, t.acc0, o), smoothing);
    write_part(ids, t, 1u, row_part(t.row + 1u, t.col, t.acc1, o), smoothing);
    write_part(ids, t, 2u, row_part(t.row + 2u, t.col, t.acc2, o), smoothing);
    write_part(ids, t, 3u, row_part(t.row + 3u, t.col, t.acc3, o), smoothing);
}

// G over row m's columns n..n+3 (product values v), into C.
fn grad_row(m: u32, n: u32, v: vec4<f32>, o: LossOpts) {
    if (m >= params.m) {
        return;
    }
    let t = targets[m];
    var w_y = 1.0;
    if ((params.loss_flags & LOSS_WEIGHTS) != 0u && !ignored_target(t, params.ignore_index, params.classes)) {
        w_y = weights[u32(t)];
    }
    var up = 1.0;
    if ((params.loss_flags & LOSS_PER_ROW) != 0u) {
        up = upstream[m];
    }
    let rg = row_grad(o, t, params.ignore_index, w_y, row_stats[m], up * params.grad_scale);
    for (var j = 0u; j < 4u; j++) {
        if (n + j < params.n) {
            let zs = transform_slope1(head_logit(v[j], n + j), o);
            c[params.c_off + m * params.ldc + n + j] = class_grad(rg, o, zs, params.col_base + n + j, smoothing_weight(n + j, o));
        }
    }
}

@compute @workgroup_size(GX, GY)
fn grad(ids: TileIds) {
    let t = tile_product(ids);
    if (!t.valid) {
        return;
    }
    let o = head_opts();
    grad_row(t.row, t.col, t.acc0, o);
    grad_row(t.row + 1u, t.col, t.acc1, o);
    grad_row(t.row + 2u, t.col, t.acc2, o);
    grad_row(t.row + 3u, t.col, t.acc3, o);
}
