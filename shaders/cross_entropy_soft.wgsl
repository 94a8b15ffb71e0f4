// Cross-entropy with probability (soft) targets, one workgroup per row:
// t' = (1 - ε) t + ε/V, loss = Σ_c w_c t'_c (lse - z_c) + s lse² with z the transformed
// logit, and the gradient (p_j (Σ_c w_c t'_c + 2 s lse) - w_j t'_j) dz/dx * scale. Pass 1 reads the logits and targets once with an online
// softmax; the weighted target sum A and B = Σ w t' (max - z) are kept relative to the
// running max (every term >= 0: masked classes add +inf or nothing, never inf - inf).
// Pass 2 (gradient) reads both again and writes the gradient.
// As a separate backward (FLAG_SAVED_LSE), the row's saved LSE replaces the one of pass 1
// (p = exp(z - lse)) and nothing but the gradient is written; FLAG_PER_ROW multiplies
// row r's gradient by upstream[r]. Rows count from the dispatch's first row in the
// logits, targets and gradient, from `row_base` in row_loss, row_lse, upstream and
// row_metrics.
// FLAG_METRICS: the evaluation metrics against the argmax of the target row
// (row_metrics.wgsl), found in a pass over the target row before pass 1, which then also
// keeps the metrics' parts; no extra read of the logits.

#import part_tree
#import row_metrics
#import row_state
#import workgroup

struct Params {
    rows: u32,
    classes: u32,
    groups_x: u32,
    flags: u32,         // FLAG_* below
    has_weights: u32,
    grad_scale: f32,    // 1 / denominator (N or n_items for mean)
    logit_scale: f32,
    softcap: f32,
    smoothing: f32,
    z_loss: f32,
    weight_total: f32,
    row_base: u32,      // first row of the dispatch in row_loss, row_lse and upstream
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> probs: array<f32>;
@group(0) @binding(3) var<storage, read_write> row_loss: array<f32>;
@group(0) @binding(4) var<storage, read_write> row_lse: array<f32>;
@group(0) @binding(5) var<storage, read_write> grad: array<f32>;
@group(0) @binding(6) var<storage, read> weights: array<f32>;
@group(0) @binding(7) var<storage, read> upstream: array<f32>;
// Two vec4 per row (row_metrics.wgsl's record), with FLAG_METRICS.
@group(0) @binding(8) var<storage, read_write> row_metrics: array<vec4<u32>>;

const FLAG_GRAD: u32 = 1u;
const FLAG_SAVED_LSE: u32 = 2u;
const FLAG_PER_ROW: u32 = 4u;
const FLAG_METRICS: u32 = 8u;

// The row's target class: the first column of its largest probability, merged across
// the workgroup. Call from uniform control flow.
fn target_class(lid: u32, base: u32, v: u32) -> u32 {
    var pm = EMPTY_MAX;
    var arg = NO_ARG;
    for (var c = lid; c < v; c += WG) {
        let p = probs[base + c];
        if (p > pm) {
            pm = p;
            arg = c;
        }
    }
    let mine = Merged(Part(RowState(pm, 0.0), 0.0, 0.0), Seen(arg, 0.0, 0.0, 0u));
    let t = merge_parts_seen(lid, lid, WG, mine, false, true).seen.arg;
    // The merges' workgroup memory is used again below.
    workgroupBarrier();
    return select(t, 0u, t == NO_ARG);
}

fn target_weight(c: u32, base: u32, o: LossOpts) -> f32 {
    let w = select(1.0, weights[c], params.has_weights != 0u);
    return w * ((1.0 - o.eps) * probs[base + c] + o.eps / f32(o.classes));
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = group_index(wid, params.groups_x);
    if (r >= params.rows) {
        return;
    }
    let o = LossOpts(params.logit_scale, params.softcap, params.smoothing, params.z_loss,
                     params.z_loss, params.weight_total, params.classes);
    let v = params.classes;
    let base = r * v;
    let metrics = (params.flags & FLAG_METRICS) != 0u;
    var t = 0u;
    var z_t = FLT_MAX;
    if (metrics) {
        t = target_class(lid, base, v);
        z_t = transform1(logits[base + t], o);
    }
    var arg = NO_ARG;
    var above = 0.0;
    var spread = 0.0;
    var nan_seen = false;
    var m = EMPTY_MAX;
    // (sum of exp(z - m), a = Σ target weights, b = Σ weight · (m − z)), four columns a
    // step added pairwise, then in two levels (blocks of 16 steps, then the blocks): a
    // long row adds no long serial chain, and the many tiny weights of a soft target are
    // not added one by one to a large a.
    var total = vec3<f32>(0.0);
    var block = vec3<f32>(0.0);
    var steps = 0u;
    for (var c = lid; c < v; c += 4u * WG) {
        let cs = vec4<u32>(c, c + WG, c + 2u * WG, c + 3u * WG);
        let inside = cs < vec4<u32>(v);
        var z = vec4<f32>(EMPTY_MAX);
        var wt = vec4<f32>(0.0);
        for (var i = 0u; i < 4u; i++) {
            if (inside[i]) {
                z[i] = transform1(logits[base + cs[i]], o);
                wt[i] = target_weight(cs[i], base, o);
                if (metrics) {
                    above += select(0.0, 1.0, z[i] > z_t);
                    nan_seen = nan_seen || nan_bits(z[i]);
                }
            }
        }
        let m4 = max(max(z.x, z.y), max(z.z, z.w));
        if (m4 > m) {
            let f = exp(m - m4);
            if (metrics) {
                // The spread moves to the new max as the sum does; the first column
                // holding the new max (columns cs ascend).
                let s_before = total.x + block.x;
                spread = select(0.0, f * (spread + s_before * (m - m4)), s_before > 0.0 && f > 0.0);
                // Downwards (ending past 0 by wrapping): the lowest match is written last.
                for (var i = 3u; i < 4u; i--) {
                    if (z[i] == m4) {
                        arg = cs[i];
                    }
                }
            }
            total = vec3<f32>(total.x * f, total.y, rebase(total.z, total.y, m, m4));
            block = vec3<f32>(block.x * f, block.y, rebase(block.z, block.y, m, m4));
            m = m4;
        }
        let e = select(vec4<f32>(0.0), exp(z - m), inside);
        if (metrics) {
            spread += dot(e, max(z - m, vec4<f32>(-FLT_MAX)));
        }
        let bt = select(vec4<f32>(0.0), wt * (m - z), wt != vec4<f32>(0.0));
        block += vec3<f32>((e.x + e.y) + (e.z + e.w), (wt.x + wt.y) + (wt.z + wt.w), (bt.x + bt.y) + (bt.z + bt.w));
        steps++;
        if (steps % 16u == 0u) {
            total += block;
            block = vec3<f32>(0.0);
        }
    }
    total += block;
    // (a, b) are a Part's (wsum, aux).
    let mine = Merged(Part(RowState(m, total.x), total.z, total.y), Seen(arg, above, spread, u32(nan_seen)));
    let merged = merge_parts_seen(lid, lid, WG, mine, true, metrics);
    let row = merged.part;
    let saved = (params.flags & FLAG_SAVED_LSE) != 0u;
    let mx = select(row.st.max, row_lse[params.row_base + r], saved);
    let log_s = select(log(row.st.sum), 0.0, saved);
    if (metrics) {
        if (lid == 0u) {
            let record = metrics_record(row.st, merged.seen, log_s, z_t, i32(t), true);
            row_metrics[2u * (params.row_base + r)] = record[0];
            row_metrics[2u * (params.row_base + r) + 1u] = record[1];
        }
    }
    let lse = mx + log_s;
    let a_total = row.wsum;
    if (lid == 0u && !saved) {
        var loss = row.aux + a_total * log_s;
        if (o.z_loss > 0.0) {
            loss += o.z_loss * lse * lse;
        }
        row_loss[params.row_base + r] = loss;
        row_lse[params.row_base + r] = lse;
    }
    if ((params.flags & FLAG_GRAD) == 0u) {
        return;
    }
    let k = a_total + 2.0 * o.z_loss * lse;
    // p = exp(z - max) / sum: see cross_entropy_rows.wgsl (sum = 1 for a saved LSE).
    let inv_sum = select(1.0 / row.st.sum, 1.0, saved);
    var scale = params.grad_scale;
    if ((params.flags & FLAG_PER_ROW) != 0u) {
        scale *= upstream[params.row_base + r];
    }
    for (var c = lid; c < v; c += WG) {
        let x = logits[base + c];
        let p = exp(transform1(x, o) - mx) * inv_sum;
        grad[base + c] = (p * k - target_weight(c, base, o)) * dtransform1(x, o) * scale;
    }
}
