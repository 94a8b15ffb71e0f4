// The merge of `Part`s (row_state.wgsl), with their metrics (`Seen`) when asked, through
// workgroup memory: a pairwise tree over each segment of `segment` consecutive
// invocations (a power of two dividing WG: WG for one row per workgroup,
// `threads_per_row` for several), log2(segment) barriers. Every adapter has it;
// row_merge_subgroup.wgsl also keeps its subgroups' parts here. Call it from uniform
// control flow.

#import row_state
#import workgroup

var<workgroup> wg_max: array<f32, WG>;
var<workgroup> wg_sum: array<f32, WG>;
// The label-smoothing sums of `Part`, merged with the states.
var<workgroup> wg_aux: array<f32, WG>;
var<workgroup> wg_wsum: array<f32, WG>;
// The metrics' parts (`Seen`), merged with the states when asked.
var<workgroup> wg_arg: array<u32, WG>;
var<workgroup> wg_above: array<f32, WG>;
var<workgroup> wg_spread: array<f32, WG>;
var<workgroup> wg_nan: array<u32, WG>;

// A part with its metrics.
struct Merged {
    part: Part,
    seen: Seen,
}

fn part_at(i: u32) -> Part {
    return Part(RowState(wg_max[i], wg_sum[i]), wg_aux[i], wg_wsum[i]);
}

// Without `smoothing` the label-smoothing sums are not stored (nor read by
// `combine_parts`).
fn store_part(i: u32, p: Part, smoothing: bool) {
    wg_max[i] = p.st.max;
    wg_sum[i] = p.st.sum;
    if (smoothing) {
        wg_aux[i] = p.aux;
        wg_wsum[i] = p.wsum;
    }
}

fn seen_at(i: u32) -> Seen {
    return Seen(wg_arg[i], wg_above[i], wg_spread[i], wg_nan[i]);
}

fn store_seen(i: u32, s: Seen) {
    wg_arg[i] = s.arg;
    wg_above[i] = s.above;
    wg_spread[i] = s.spread;
    wg_nan[i] = s.nan;
}

// The parts (and, with `metrics`, their `Seen`s) of the segment of invocation `lid` (its
// `lane`-th) combined, in every invocation of the segment.
fn merge_parts_seen(lid: u32, lane: u32, segment: u32, mine: Merged, smoothing: bool, metrics: bool) -> Merged {
    store_part(lid, mine.part, smoothing);
    if (metrics) {
        store_seen(lid, mine.seen);
    }
    workgroupBarrier();
    for (var stride = segment / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            let a = part_at(lid);
            let b = part_at(lid + stride);
            if (metrics) {
                store_seen(lid, combine_seen(a.st, seen_at(lid), b.st, seen_at(lid + stride)));
            }
            store_part(lid, combine_parts(a, b, smoothing), smoothing);
        }
        workgroupBarrier();
    }
    let first = lid - lane; // the first invocation of the segment
    var out = Merged(part_at(first), NO_SEEN);
    if (metrics) {
        out.seen = seen_at(first);
    }
    return out;
}

// The parts of the segment of invocation `lid` (its `lane`-th) combined, in every
// invocation of the segment.
fn merge_parts(lid: u32, lane: u32, segment: u32, mine: Part, smoothing: bool) -> Part {
    return merge_parts_seen(lid, lane, segment, Merged(mine, NO_SEEN), smoothing, false).part;
}
