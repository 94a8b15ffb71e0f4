// The linear head's epilogues of gemm.wgsl: entry points beside its `main`, over the
// same tile product, so that the tile of logits x = h Wᵀ + b never goes to memory
// (src/gpu/linear.rs):
// - `partials`: each row's online-softmax part over the tile's columns, in
//   merge_partials.wgsl's entries ((max, sum, target z, 1 if the target is here),
//   (Σ w (max − z), Σ w, 0, 0), and with LOSS_METRICS the metrics' `Seen` against the
//   row's target logit from head_target.wgsl), the GX invocations of a row combined in
//   order; merge_partials.wgsl then combines a row's blocks (tiles) into its loss,
//   statistics and metric record.
// - `grad`: G = ∂loss/∂x from the rows' statistics (class_grad.wgsl), written to C, for
//   the products dh = G W, dW = Gᵀ h.
// C's rows, the targets, statistics and per-row values are the chunk's (row 0 first);
// `col_base` is the class of C's column 0.

#import class_grad
#import row_metrics

const LOSS_WEIGHTS: u32 = 1u;
const LOSS_PER_ROW: u32 = 2u;
const LOSS_METRICS: u32 = 4u;
// A `Seen`'s column and NaN flag in one word of workgroup memory: a NaN row predicts −1
// whatever its column.
const NAN_WORD: u32 = 0xfffffffeu;

@group(0) @binding(5) var<storage, read> targets: array<i32>;
@group(0) @binding(6) var<storage, read> weights: array<f32>;
@group(0) @binding(7) var<storage, read> row_stats: array<vec2<f32>>;
// `grad`: each row's upstream gradient (LOSS_PER_ROW); `partials`: each row's target
// logit (LOSS_METRICS).
@group(0) @binding(8) var<storage, read> per_row: array<f32>;

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
    seen: Seen,
    z_t: f32,
}

// This invocation's part of row m over its columns n..n+3 (product values v), and with
// `metrics` its `Seen`: the count above the row's target logit leaves out the target's
// own column (its logit here and head_target's may differ in the last bit).
fn row_part(m: u32, n: u32, v: vec4<f32>, o: LossOpts, metrics: bool) -> RowPart {
    var r = RowPart(Part(RowState(EMPTY_MAX, 0.0), 0.0, 0.0), NO_SEEN, 0.0);
    if (m >= params.m) {
        return r;
    }
    let t_class = target_class(m);
    var z_m = FLT_MAX;
    if (metrics) {
        z_m = per_row[m];
    }
    for (var j = 0u; j < 4u; j++) {
        if (n + j < params.n) {
            let col = params.col_base + n + j;
            let z = transform1(head_logit(v[j], n + j), o);
            if (metrics) {
                r.seen = push_seen(r.part.st, r.seen, z, col, select(z_m, FLT_MAX, col == t_class));
            }
            r.part = push_part(r.part, z, smoothing_weight(n + j, o), o.eps > 0.0);
            if (col == t_class) {
                r.z_t = z;
            }
        }
    }
    return r;
}

// Combines row t.row + slot's parts over the GX invocations of each workgroup row, in
// order, and writes the tile's entry. The operand tiles are free once the product is
// done: they hold the parts, four floats an invocation in each (4 · GX · GY <=
// TILE_FLOATS, checked by the host). Which invocation holds the target follows from the
// columns, so only its z is kept.
fn write_part(ids: TileIds, t: Tile, slot: u32, r: RowPart, smoothing: bool, metrics: bool) {
    let lid = ids.lid;
    sa[4u * lid] = r.part.st.max;
    sa[4u * lid + 1u] = r.part.st.sum;
    sa[4u * lid + 2u] = r.part.aux;
    sa[4u * lid + 3u] = r.part.wsum;
    sb[4u * lid] = r.z_t;
    sb[4u * lid + 1u] = r.seen.above;
    sb[4u * lid + 2u] = r.seen.spread;
    sb[4u * lid + 3u] = bitcast<f32>(select(r.seen.arg, NAN_WORD, r.seen.nan != 0u));
    workgroupBarrier();
    let m = t.row + slot;
    if (ids.lid3.x == 0u && m < params.m) {
        var acc = Part(RowState(EMPTY_MAX, 0.0), 0.0, 0.0);
        var seen = NO_SEEN;
        // lid is the first invocation of this workgroup row (tx = 0).
        for (var x = 0u; x < GX; x++) {
            let i = lid + x;
            let part = Part(RowState(sa[4u * i], sa[4u * i + 1u]), sa[4u * i + 2u], sa[4u * i + 3u]);
            if (metrics) {
                let word = bitcast<u32>(sb[4u * i + 3u]);
                let s = Seen(select(word, NO_ARG, word == NAN_WORD), sb[4u * i + 1u], sb[4u * i + 2u],
                    u32(word == NAN_WORD));
                seen = combine_seen(acc.st, seen, part.st, s);
            }
            acc = combine_parts(acc, part, smoothing);
        }
        // The target's column, if it is in this tile: invocation x of the row holds
        // columns n0 + 4x .. n0 + 4x + 3.
        let tc = target_class(m);
        let first = params.col_base + t.n0;
        let here = tc != 0xffffffffu && tc >= first && tc - params.col_base < min(t.n0 + 4u * GX, params.n);
        var z_t = 0.0;
        if (here) {
            z_t = sb[4u * (lid + (tc - first) / 4u)];
        }
        let at = 12u * (m * params.out_stride + params.out_base + t.n0 / (4u * GX));
        c[at] = acc.st.max;
        c[at + 1u] = acc.st.sum;
        c[at + 2u] = z_t;
        c[at + 3u] = select(0.0, 1.0, here);
        c[at + 4u] = acc.aux;
        c[at + 5u] = acc.wsum;
        c[at + 6u] = 0.0;
        c[at + 7u] = 0.0;
        let sv = seen_vec(seen);
        c[at + 8u] = sv.x;
        c[at + 9u] = sv.y;
        c[at + 10u] = sv.z;
        c[at + 11u] = sv.w;
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
    let metrics = (params.loss_flags & LOSS_METRICS) != 0u;
    // TR is a pipeline constant: the loop's barriers stay in uniform control flow.
    for (var slot = 0u; slot < TR; slot++) {
        write_part(ids, t, slot, row_part(t.row + slot, t.col, tile_acc(t, slot), o, metrics), smoothing, metrics);
    }
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
        up = per_row[m];
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
    for (var slot = 0u; slot < TR; slot++) {
        grad_row(t.row + slot, t.col, tile_acc(t, slot), o);
    }
}
