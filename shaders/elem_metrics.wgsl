// The per-element parts of the metrics (row_metrics.wgsl) for the fused kernel's element
// type (`Elem` of WIDTH columns, from elem_*.wgsl).

#import row_metrics

// Whether an element holds a NaN.
fn nan_in(x: Elem) -> bool {
    var any = false;
    for (var j = 0u; j < WIDTH; j++) {
        any = any || nan_bits(lane_of(x, j));
    }
    return any;
}

// The first column of element `x` (its first column `col`) holding `m`, or NO_ARG.
fn first_at(x: Elem, m: f32, col: u32) -> u32 {
    for (var j = 0u; j < WIDTH; j++) {
        if (lane_of(x, j) == m) {
            return col + j;
        }
    }
    return NO_ARG;
}

// 1 in each lane of `x` above `z_t`, when `live` (a column of the row).
fn above_of(x: Elem, z_t: f32, live: bool) -> Elem {
    return select(splat(0.0), select(splat(0.0), splat(1.0), x > splat(z_t)), live);
}

// e (z − m) for the spread, 0 for a masked class (e = 0, z − m = −inf).
fn spread_of(e: Elem, d: Elem) -> Elem {
    return e * max(d, splat(-FLT_MAX));
}
