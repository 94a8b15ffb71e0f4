// Evaluation metrics of the fused row kernel (F_METRICS; shared/docs/semantics.md,
// "Evaluation metrics"), taken in the pass that already reads each element: every
// invocation keeps its first maximum's column, the count of its elements above the
// target's logit, Σ e (z − m) beside Σ e (e = exp(z − m), m its running max) and whether
// it saw a NaN. Once the row's max M is known, `merge_metrics` moves each invocation's
// sum to M and merges them across the row's invocations; the Rust twin is
// `RowMetrics::from_stats` in src/metrics.rs. The fused kernel takes it through
// elem_metrics.wgsl (the per-element parts, for its element type) with
// row_metrics_store.wgsl (binding 9) or row_metrics_off.wgsl (no binding); the soft-target
// kernel directly, with its own binding.

#import row_state
#import workgroup

// The column of an invocation that has seen no finite maximum (a row of only −inf);
// such a row predicts class 0, as torch.argmax does.
const NO_ARG: u32 = 0xffffffffu;
const FLT_MAX: f32 = 3.40282347e38;

// What one invocation has seen of a row: its state (max, sum) and the metrics' parts.
struct Seen {
    max: f32,
    sum: f32,
    arg: u32,     // the first column holding `max` (NO_ARG: none)
    above: f32,   // elements above the target's logit (exact below 2^24)
    spread: f32,  // Σ exp(z − max) (z − max)
    nan: u32,     // 1: a NaN was seen
}

var<workgroup> wm_arg: array<u32, WG>;
var<workgroup> wm_above: array<f32, WG>;
var<workgroup> wm_spread: array<f32, WG>;
var<workgroup> wm_nan: array<u32, WG>;

// Whether x is a NaN, from its bits: a compiler may assume no NaN occurs and fold
// `x != x` away, not an integer test.
fn nan_bits(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// The row's merged metrics in every invocation of its segment (`tpr` invocations from
// lane 0), given the row's max: spreads moved to `row_max` and added, the lowest column
// holding it, counts added, NaN flags or-ed. Call from uniform control flow.
fn merge_metrics(lid: u32, lane: u32, tpr: u32, mine: Seen, row_max: f32) -> Seen {
    let f = exp(mine.max - row_max);
    wm_spread[lid] = select(0.0, f * (mine.spread + mine.sum * (mine.max - row_max)), mine.sum > 0.0);
    wm_arg[lid] = select(NO_ARG, mine.arg, mine.max == row_max);
    wm_above[lid] = mine.above;
    wm_nan[lid] = mine.nan;
    workgroupBarrier();
    for (var stride = tpr / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            wm_spread[lid] += wm_spread[lid + stride];
            wm_arg[lid] = min(wm_arg[lid], wm_arg[lid + stride]);
            wm_above[lid] += wm_above[lid + stride];
            wm_nan[lid] = max(wm_nan[lid], wm_nan[lid + stride]);
        }
        workgroupBarrier();
    }
    let first = lid - lane;
    return Seen(row_max, 0.0, wm_arg[first], wm_above[first], wm_spread[first], wm_nan[first]);
}

// A row's record from its merged state (sum = Σ exp(z − M)): (pred as i32 bits, above as
// u32 bits, confidence, entropy), (nll, the target class as i32 bits, 0, 0). A row of
// only −inf (sum 0) has NaN confidence and entropy; nll is 0 and the target −1 for an
// ignored row.
fn metrics_record(seen: Seen, sum: f32, log_s: f32, z_t: f32, scored: i32, counted: bool) -> array<vec4<f32>, 2> {
    let nan_value = bitcast<f32>(0x7fc00000u);
    let live = sum > 0.0;
    var pred = select(i32(seen.arg), 0, seen.arg == NO_ARG);
    pred = select(pred, -1, seen.nan != 0u);
    let above = select(0u, u32(seen.above), counted);
    let confidence = select(nan_value, 1.0 / sum, live);
    let entropy = select(nan_value, log_s - seen.spread / sum, live);
    let nll = select(0.0, (seen.max - z_t) + log_s, counted);
    return array<vec4<f32>, 2>(
        vec4<f32>(bitcast<f32>(pred), bitcast<f32>(above), confidence, entropy),
        vec4<f32>(nll, bitcast<f32>(select(-1, scored, counted)), 0.0, 0.0));
}
