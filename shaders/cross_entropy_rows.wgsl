// Fused log-softmax + cross-entropy. The host composes it with an element type
// (elem_vec4.wgsl when V is a multiple of 4, elem_f32.wgsl otherwise; elem_f16.wgsl,
// elem_f16_native.wgsl or elem_bf16.wgsl for half-precision logits, with grad_f32x2.wgsl
// or grad_half.wgsl) and a row merge (row_merge_subgroup.wgsl when the device has
// subgroups, row_merge_workgroup.wgsl otherwise): see `rows_source` in
// src/gpu/kernels.rs. The element type declares the logits (binding 1) and gradient
// (binding 5) arrays and how to load and store them; the merge declares the entry point's
// builtins (`Ids`) and `merge_row`.
// Indices below count elements of WIDTH columns. Each row is handled by
// `threads_per_row` invocations (a power of two up to WG, chosen by the host from V),
// so a workgroup serves WG / threads_per_row rows: one row per workgroup for long rows,
// many short rows per workgroup for small vocabularies.
//
// Two ways through a row, chosen by the host (`cached`):
// - Cached (V <= threads_per_row * CACHED * WIDTH): each invocation loads its elements
//   into registers once, takes their max, and keeps e = exp(z - local max). The
//   workgroup merges the (max, sum) states with `combine`; the gradient is
//   e * exp(local max - max) / sum. One read, one write, one exp per element.
// - Streaming (longer rows): pass 1 reads the row once, four elements per step: their
//   max, one rescale of the running sum when it grows, four exps. Pass 2, only when a
//   gradient is asked for, reads the row again and writes it. Loss only: 1 read; loss +
//   gradient: 2 reads + 1 write.
// The loss sees z = transform(x) (logit scale, softcap); class weights, label smoothing
// and z-loss follow shared/docs/semantics.md. The gradient goes to `grad` or over the
// logits.

#import grad_mode
#import part_tree
#import elem_metrics
#import row_state
#import targets
#import workgroup

// Which options this pipeline computes (F_* bits). The host builds one pipeline per
// combination in use, so PyTorch's plain loss pays nothing for the options it lacks
// (`KernelOpts::features` on the host).
override FEATURES: u32 = 0u;
const F_WEIGHTS: u32 = 1u;
const F_SMOOTHING: u32 = 2u;
const F_Z_LOSS: u32 = 4u;
const F_SOFTCAP: u32 = 8u;
const F_SCALE: u32 = 16u;
const F_METRICS: u32 = 32u; // the evaluation metrics (row_metrics.wgsl)

fn has(feature: u32) -> bool {
    return (FEATURES & feature) != 0u;
}

// Floats each invocation keeps in registers on the cached path: the host sets it to
// `Tuning::cached_per_thread` (this value is its default, `ROWS_CACHED`).
const CACHED_FLOATS: u32 = 32u;
// The same in elements of WIDTH columns.
const CACHED: u32 = max(CACHED_FLOATS / WIDTH, 1u);

struct Params {
    rows: u32,          // rows in this dispatch
    classes: u32,       // V
    row_base: u32,      // first row of this dispatch in `targets` and the row outputs
    groups_x: u32,      // x size of the (folded) 2D dispatch
    grad_scale: f32,    // upstream gradient (divided by norm[0] below)
    grad_mode: u32,
    ignore_index: i32,
    threads_per_row: u32, // power of two, <= WG
    cached: u32,        // 1: the row fits the cached path
    logit_scale: f32,
    softcap: f32,       // 0: none
    smoothing: f32,
    z_loss: f32,
    weight_total: f32,  // Σ_c w_c
    z_grad: f32,        // the z-loss scale of the gradient (see LossOpts)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> row_lse: array<f32>;
// (max, sum) of each row, for a later cross_entropy_backward.wgsl pass.
@group(0) @binding(6) var<storage, read_write> row_stats: array<vec2<f32>>;
// The `mean` denominator (1 for sum/none), possibly reduced on the device from
// row_weights.wgsl: the gradient scale is grad_scale / norm[0]. norm[1] multiplies
// z_grad: 1, or the ratio of the two `mean` denominators reduced on the device (z-loss
// with class weights, see LossOpts).
@group(0) @binding(7) var<storage, read> norm: array<f32>;
// Class weights [V] (binding 8, a dummy without F_WEIGHTS) are declared by the element
// type, with `weights_of` and `class_weight`.

// The options, with every feature this pipeline lacks a constant that folds away.
fn opts() -> LossOpts {
    return LossOpts(
        select(1.0, params.logit_scale, has(F_SCALE)),
        select(0.0, params.softcap, has(F_SOFTCAP)),
        select(0.0, params.smoothing, has(F_SMOOTHING)),
        select(0.0, params.z_loss, has(F_Z_LOSS)),
        select(0.0, params.z_grad * norm[1], has(F_Z_LOSS)),
        select(f32(params.classes), params.weight_total, has(F_WEIGHTS)),
        params.classes);
}

// ROW_LOOP: workgroups take row groups (WG / threads_per_row rows each) in turn: group g,
// then g + the dispatch's size, ... The host dispatches fewer workgroups than row groups
// (`Tuning::max_workgroups`) to bound the rows in flight, so that the second read of a
// long row still finds it in the cache. The loop's bounds are per-workgroup values, so
// the barriers inside stay in uniform control flow. Without it, one row group per
// workgroup and no loop, which CPU adapters run markedly faster.
override ROW_LOOP: bool = false;

@compute @workgroup_size(WG)
fn main(ids: Ids, @builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let groups = (params.rows + WG / params.threads_per_row - 1u) / (WG / params.threads_per_row);
    var g = group_index(wid, params.groups_x);
    // One call site: the row body is compiled once whether or not it loops.
    loop {
        row_group(ids, g);
        g += nwg.x * nwg.y;
        if (!ROW_LOOP || g >= groups) {
            break;
        }
        // The next group reuses the merge's workgroup memory.
        workgroupBarrier();
    }
}

// How many of the columns lane, lane + tpr, ... fall below v.
fn lane_steps(lane: u32, v: u32, tpr: u32) -> u32 {
    return select(0u, (v - lane + tpr - 1u) / tpr, lane < v);
}

// One group of rows: `threads_per_row` invocations per row.
fn row_group(ids: Ids, group: u32) {
    let lid = ids.lid;
    let o = opts();
    let has_w = has(F_WEIGHTS);
    let smoothing = has(F_SMOOTHING);
    let tpr = params.threads_per_row;
    let lane = lid % tpr;
    let r = group * (WG / tpr) + lid / tpr;
    // Invocations past the last row still take part in the barriers below.
    let in_batch = r < params.rows;
    let v = select(0u, params.classes / WIDTH, in_batch);
    let base = r * (params.classes / WIDTH);
    let cached = params.cached != 0u;
    let metrics = has(F_METRICS);
    var t = -1;
    if (in_batch) {
        t = targets[params.row_base + r];
    }
    // The columns this kernel sees (none past the batch), so that every index stays in
    // bounds whatever the targets.
    let ignored = ignored_target(t, params.ignore_index, v * WIDTH);
    // With metrics every invocation counts its elements above the target's logit, read
    // first (and then cached).
    var z_t = FLT_MAX;
    if (metrics && !ignored) {
        z_t = lane_of(transform(load_logit(base + u32(t) / WIDTH), o), u32(t) % WIDTH);
    }
    var arg = NO_ARG;
    var above_e = splat(0.0);
    var spread_e = splat(0.0);
    var nan_seen = false;
    // Pass 1: this invocation's (max, sum) state, and its smoothing sum.
    var e: array<Elem, CACHED>;
    var st = RowState(EMPTY_MAX, 0.0);
    var aux = 0.0;
    var wsum = 0.0;
    if (cached) {
        var m = EMPTY_MAX;
        for (var j = 0u; j < CACHED; j++) {
            let c = lane + j * tpr;
            if (c < v) {
                e[j] = transform(load_logit(base + c), o);
                let h = hmax(e[j]);
                if (metrics) {
                    // The element of the first max; its column is found after the loop.
                    if (h > m) {
                        arg = j;
                    }
                    above_e += above_of(e[j], z_t, true);
                    nan_seen = nan_seen || nan_in(e[j]);
                }
                m = max(m, h);
            }
        }
        if (metrics && arg != NO_ARG) {
            arg = first_at(e[arg], m, (lane + arg * tpr) * WIDTH);
        }
        var s = 0.0;
        for (var j = 0u; j < CACHED; j++) {
            let c = lane + j * tpr;
            if (c < v) {
                if (smoothing) {
                    let w = weights_of(c, has_w);
                    aux += hsum(w * (m - e[j]));
                    wsum += hsum(w);
                }
                let z = e[j];
                e[j] = exp(z - m);
                if (metrics) {
                    spread_e += spread_of(e[j], z - m);
                }
                s += hsum(e[j]);
            }
        }
        st = RowState(m, s);
    } else {
        let step = 4u * tpr;
        let pad = splat(EMPTY_MAX);
        let zero = splat(0.0);
        // Two-level sums: a block of up to 8 steps, then the block into the total, so an
        // invocation that takes thousands of terms (CPU adapters give a row few
        // invocations) adds no long serial chain (shared/docs/semantics.md, Precision).
        var block = zero;
        var total = zero;
        var steps = 0u;
        // The smoothing sums per lane of Elem (summed across lanes after the loop, not per
        // element): Σ w (max - z) relative to st.max, and Σ w.
        var aux_e = zero;
        var wsum_e = zero;
        for (var c = lane; c < v; c += step) {
            let c1 = c + tpr;
            let c2 = c + 2u * tpr;
            let c3 = c + 3u * tpr;
            let x0 = transform(load_logit(base + c), o);
            let x1 = select(pad, transform(load_logit(base + min(c1, v - 1u)), o), c1 < v);
            let x2 = select(pad, transform(load_logit(base + min(c2, v - 1u)), o), c2 < v);
            let x3 = select(pad, transform(load_logit(base + min(c3, v - 1u)), o), c3 < v);
            let m4 = hmax(max(max(x0, x1), max(x2, x3)));
            if (m4 > st.max) {
                let f = exp(st.max - m4);
                if (metrics) {
                    // The spread moves to the new max as the sum does (rebase of the
                    // terms' z − max); an empty lane stays 0.
                    let s_l = block + total;
                    let moved = f * (spread_e + select(zero, s_l * (st.max - m4), s_l > zero));
                    // f = 0: the old terms vanish (st.max − m4 may be −inf).
                    spread_e = select(zero, moved, f > 0.0);
                    // The step of the first max; its column is found after the loop.
                    arg = c;
                }
                block *= f;
                total *= f;
                if (smoothing) {
                    // rebase (row_state.wgsl) per lane: an empty lane stays 0.
                    aux_e += select(zero, wsum_e * (m4 - st.max), wsum_e > zero);
                }
                st.max = m4;
            }
            let m = st.max;
            if (metrics) {
                let e0 = exp(x0 - m);
                let e1 = select(zero, exp(x1 - m), c1 < v);
                let e2 = select(zero, exp(x2 - m), c2 < v);
                let e3 = select(zero, exp(x3 - m), c3 < v);
                block += (e0 + e1) + (e2 + e3);
                spread_e += (spread_of(e0, x0 - m) + spread_of(e1, x1 - m))
                    + (spread_of(e2, x2 - m) + spread_of(e3, x3 - m));
                above_e += (above_of(x0, z_t, true) + above_of(x1, z_t, c1 < v))
                    + (above_of(x2, z_t, c2 < v) + above_of(x3, z_t, c3 < v));
                nan_seen = nan_seen || nan_in(x0) || nan_in(x1) || nan_in(x2) || nan_in(x3);
            } else {
                block += (exp(x0 - m) + select(zero, exp(x1 - m), c1 < v))
                    + (select(zero, exp(x2 - m), c2 < v) + select(zero, exp(x3 - m), c3 < v));
            }
            steps++;
            if (steps % 8u == 0u) {
                total += block;
                block = zero;
            }
            if (smoothing) {
                let me = splat(m);
                let w0 = weights_of(c, has_w);
                aux_e += w0 * (me - x0);
                wsum_e += w0;
                if (c1 < v) { let w = weights_of(c1, has_w); aux_e += w * (me - x1); wsum_e += w; }
                if (c2 < v) { let w = weights_of(c2, has_w); aux_e += w * (me - x2); wsum_e += w; }
                if (c3 < v) { let w = weights_of(c3, has_w); aux_e += w * (me - x3); wsum_e += w; }
            }
        }
        st.sum = hsum(total + block);
        aux = hsum(aux_e);
        wsum = hsum(wsum_e);
        if (metrics && arg != NO_ARG) {
            // The first column holding the max within its step, in column order (the
            // step's elements read again, once).
            let c = arg;
            let x0 = transform(load_logit(base + c), o);
            var a = first_at(x0, st.max, c * WIDTH);
            for (var k = 1u; k < 4u && a == NO_ARG; k++) {
                let ck = c + k * tpr;
                if (ck < v) {
                    a = first_at(transform(load_logit(base + ck), o), st.max, ck * WIDTH);
                }
            }
            arg = a;
        }
    }
    let local = st;

    // Merge the row's states across its invocations (row_merge_*.wgsl).
    let mine = Merged(Part(st, aux, wsum), Seen(arg, hsum(above_e), hsum(spread_e), u32(nan_seen)));
    let merged_all = merge_row(ids, lane, mine);
    let merged = merged_all.part;
    let m = merged.st.max;
    let sum = merged.st.sum;
    let log_s = log(sum);
    if (metrics && in_batch && lane == 0u) {
        store_row_metrics(params.row_base + r, metrics_record(merged.st, merged_all.seen, log_s, z_t, t, !ignored));
    }

    var w_y = 1.0;
    if (has_w && !ignored) {
        w_y = class_weight(u32(t));
    }
    if (in_batch && lane == 0u) {
        var loss = 0.0;
        if (!ignored) {
            let z_t = lane_of(transform(load_logit(base + u32(t) / WIDTH), o), u32(t) % WIDTH);
            let smooth_sum = merged.aux; // Σ_c w_c (max - z_c)
            loss = row_loss_of(o, m, log_s, z_t, w_y, smooth_sum);
        }
        row_loss[params.row_base + r] = loss;
        row_lse[params.row_base + r] = m + log_s;
        row_stats[params.row_base + r] = vec2<f32>(m, sum);
    }
    if (params.grad_mode == GRAD_NONE) {
        return;
    }
    // Lane 0 has read x_t above; nobody overwrites the row before this barrier.
    workgroupBarrier();
    if (!in_batch) {
        return;
    }
    let scale = params.grad_scale / norm[0];
    let tc = select(v * WIDTH, u32(t), !ignored);
    let k = grad_k(o, m, log_s, w_y);
    // p = exp(z - max) / sum, not exp(z - max - log(sum)): GPUs may compute log with an
    // absolute error of 2^-21 for sums near 1, a relative error of p that a gradient of
    // magnitude 2 (sum reduction, class weights) turns into several ULP.
    let inv_sum = 1.0 / sum;
    let smooth_w = o.eps / f32(o.classes);
    // Each class's own weight enters the gradient through label smoothing alone: without
    // it the per-element weight load folds away (0 · w would not: w may be NaN).
    let smooth_has_w = has_w && smoothing;
    let target_w = (1.0 - o.eps) * w_y;
    // Branches on the mode and on `ignored` stay outside the loops: they are uniform per
    // row, and CPU adapters would otherwise mask every store of both sides.
    let in_place = params.grad_mode == GRAD_IN_PLACE;
    if (ignored) {
        for (var c = lane; c < v; c += tpr) {
            if (in_place) { store_logit(base + c, splat(0.0)); } else { store_grad(base + c, splat(0.0)); }
        }
    } else if (cached) {
        // p = e * exp(local max - max) / sum: one exp per invocation.
        let factor = exp(local.max - m) / sum;
        for (var j = 0u; j < CACHED; j++) {
            let c = lane + j * tpr;
            if (c < v) {
                let d = e[j] * factor * k - smooth_w * weights_of(c, smooth_has_w) - onehot(c * WIDTH, tc) * target_w;
                // Only a softcap needs x again for its derivative.
                var dz = splat(o.scale);
                if (o.softcap > 0.0) {
                    dz = dtransform(load_logit(base + c), o);
                }
                let g = d * dz * scale;
                if (in_place) { store_logit(base + c, g); } else { store_grad(base + c, g); }
            }
        }
    } else {
        // Backwards through the row: its end, read last in pass 1, is the part most likely
        // still in the cache. Four elements a step, the four loads before any store (CPU
        // adapters run each load as a loop over the SIMD lanes; on lavapipe 6–9 % faster
        // than one a step, docs/benchmarks.md), then the rest one by one.
        let g = GradRow(base, m, inv_sum, k, smooth_w, smooth_has_w, tc, target_w, scale);
        // One call a mode with a constant argument: each inlined copy has its store fixed.
        if (in_place) {
            grad_pass(g, lane, v, tpr, o, true);
        } else {
            grad_pass(g, lane, v, tpr, o, false);
        }
    }
}

// The streaming gradient pass over one invocation's elements of a row, over the logits
// (`in_place`, a constant at each call) or into `grad`.
fn grad_pass(g: GradRow, lane: u32, v: u32, tpr: u32, o: LossOpts, in_place: bool) {
    var i = lane_steps(lane, v, tpr);
    while (i >= 4u) {
        i -= 4u;
        let c = lane + i * tpr;
        let q = grad4(g, c, tpr, o);
        store_elem(in_place, g.base + c + 3u * tpr, q.g3);
        store_elem(in_place, g.base + c + 2u * tpr, q.g2);
        store_elem(in_place, g.base + c + tpr, q.g1);
        store_elem(in_place, g.base + c, q.g0);
    }
    while (i > 0u) {
        i--;
        let c = lane + i * tpr;
        store_elem(in_place, g.base + c, grad_of(g, c, load_logit(g.base + c), o));
    }
}

fn store_elem(in_place: bool, i: u32, e: Elem) {
    if (in_place) { store_logit(i, e); } else { store_grad(i, e); }
}

// What the streaming gradient pass needs of its row (see `row_group`).
struct GradRow {
    base: u32,
    max: f32,
    inv_sum: f32,
    k: f32,
    smooth_w: f32,
    smooth_has_w: bool,
    target_col: u32, // the target's column (V·WIDTH when ignored: no column)
    target_w: f32,
    scale: f32,
}

// The gradients of elements c, c + tpr, c + 2·tpr, c + 3·tpr: the four loads first.
struct Grad4 {
    g0: Elem,
    g1: Elem,
    g2: Elem,
    g3: Elem,
}

fn grad4(g: GradRow, c: u32, tpr: u32, o: LossOpts) -> Grad4 {
    let x0 = load_logit(g.base + c);
    let x1 = load_logit(g.base + c + tpr);
    let x2 = load_logit(g.base + c + 2u * tpr);
    let x3 = load_logit(g.base + c + 3u * tpr);
    return Grad4(grad_of(g, c, x0, o), grad_of(g, c + tpr, x1, o), grad_of(g, c + 2u * tpr, x2, o),
        grad_of(g, c + 3u * tpr, x3, o));
}

// The gradient of element c (columns c·WIDTH..) of the row, x its logits.
fn grad_of(g: GradRow, c: u32, x: Elem, o: LossOpts) -> Elem {
    var dz: Elem;
    let z = transform_slope(x, o, &dz);
    let p = exp(z - g.max) * g.inv_sum;
    let d = p * g.k - g.smooth_w * weights_of(c, g.smooth_has_w) - onehot(c * WIDTH, g.target_col) * g.target_w;
    return d * dz * g.scale;
}
