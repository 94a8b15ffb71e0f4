// The merge of `Part`s (row_state.wgsl) through workgroup memory: a pairwise tree over
// each segment of `segment` consecutive invocations (a power of two dividing WG: WG for
// one row per workgroup, `threads_per_row` for several), log2(segment) barriers. Every
// adapter has it; row_merge_subgroup.wgsl also keeps its subgroups' parts here. Call it
// from uniform control flow.

#import row_state
#import workgroup

var<workgroup> wg_max: array<f32, WG>;
var<workgroup> wg_sum: array<f32, WG>;
// The label-smoothing sums of `Part`, merged with the states.
var<workgroup> wg_aux: array<f32, WG>;
var<workgroup> wg_wsum: array<f32, WG>;

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

// The parts of the segment of invocation `lid` (its `lane`-th) combined, in every
// invocation of the segment.
fn merge_parts(lid: u32, lane: u32, segment: u32, mine: Part, smoothing: bool) -> Part {
    store_part(lid, mine, smoothing);
    workgroupBarrier();
    for (var stride = segment / 2u; stride > 0u; stride = stride / 2u) {
        if (lane < stride) {
            store_part(lid, combine_parts(part_at(lid), part_at(lid + stride), smoothing), smoothing);
        }
        workgroupBarrier();
    }
    return part_at(lid - lane); // the first invocation of the segment
}
