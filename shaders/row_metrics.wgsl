// Evaluation metrics of the row kernels (shared/docs/semantics.md, "Evaluation
// metrics"), taken in the pass that already reads each element: every invocation keeps a
// `Seen` (row_state.wgsl) — its first maximum's column, the count of its elements above
// the target's logit, Σ e (z − m) beside Σ e (e = exp(z − m), m its running max) and
// whether it saw a NaN — merged across the row's invocations with the states
// (`combine_seen`, in part_tree.wgsl's tree or the subgroup merge); here, the row's
// record. The Rust twin is `RowMetrics::from_stats` in src/metrics.rs. The fused kernel
// takes this file through elem_metrics.wgsl (the per-element parts, for its element
// type) with row_metrics_store.wgsl (binding 9) or row_metrics_off.wgsl (no binding); the
// soft-target kernel directly, with its own binding.

#import row_state

const FLT_MAX: f32 = 3.40282347e38;

// Whether x is a NaN, from its bits: a compiler may assume no NaN occurs and fold
// `x != x` away, not an integer test.
fn nan_bits(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// `s` with one more transformed logit z of column `col` after the state `a` (the part
// before z): the per-element form of the metrics, for kernels that push elements one by
// one (row_partials.wgsl).
fn push_seen(a: RowState, s: Seen, z: f32, col: u32, z_t: f32) -> Seen {
    let m = max(a.max, z);
    let e = exp(z - m);
    return Seen(select(s.arg, col, z > a.max), s.above + select(0.0, 1.0, z > z_t),
        rebase_spread(a, s.spread, m) + e * max(z - m, -FLT_MAX), max(s.nan, u32(nan_bits(z))));
}

// A partial entry's metrics (merge_partials' third vec4) and back: the column and the
// NaN flag as their bits.
fn seen_vec(s: Seen) -> vec4<f32> {
    return vec4<f32>(bitcast<f32>(s.arg), s.above, s.spread, bitcast<f32>(s.nan));
}

fn seen_of(v: vec4<f32>) -> Seen {
    return Seen(bitcast<u32>(v.x), v.y, v.z, bitcast<u32>(v.w));
}

// A row's record from its merged state `st` (sum = Σ exp(z − max)) and metrics, as u32
// words (floats as their bits, so no move of a float can touch an integer's bits):
// (pred as i32 bits, above, confidence, entropy), (nll, the target class as i32 bits,
// 0, 0). A row of only −inf (sum 0) predicts class 0, as torch.argmax does, with NaN
// confidence and entropy; a row holding a NaN predicts −1; nll is 0 and the target −1
// for an ignored row.
fn metrics_record(st: RowState, seen: Seen, log_s: f32, z_t: f32, scored: i32, counted: bool) -> array<vec4<u32>, 2> {
    let nan_value = bitcast<f32>(0x7fc00000u);
    let live = st.sum > 0.0;
    var pred = select(i32(seen.arg), 0, seen.arg == NO_ARG);
    pred = select(pred, -1, seen.nan != 0u);
    let above = select(0u, u32(seen.above), counted);
    let confidence = select(nan_value, 1.0 / st.sum, live);
    let entropy = select(nan_value, log_s - seen.spread / st.sum, live);
    let nll = select(0.0, (st.max - z_t) + log_s, counted);
    return array<vec4<u32>, 2>(
        vec4<u32>(bitcast<u32>(pred), above, bitcast<u32>(confidence), bitcast<u32>(entropy)),
        vec4<u32>(bitcast<u32>(nll), bitcast<u32>(select(-1, scored, counted)), 0u, 0u));
}
