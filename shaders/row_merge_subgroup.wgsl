// The row merge of cross_entropy_rows.wgsl on devices with subgroups (wgpu's SUBGROUP).
// When one row fills the workgroup (long rows, the case where the merge costs most),
// each subgroup folds its states with subgroupMax and subgroupAdd (the `combine` rule
// applied to the whole subgroup at once: sum of s * exp(max - M) with M the subgroup's
// max), and one barrier later each subgroup folds the subgroups' states from workgroup
// memory the same way: 1 barrier instead of log2(WG). Several rows per workgroup take the
// tree (part_tree.wgsl): a subgroup may span rows, and nothing guarantees which
// invocations form one.

#import part_tree

struct Ids {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_size) sg_size: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) sg_count: u32,
}

// The subgroup's parts combined, in every invocation of it. Empty states (max
// EMPTY_MAX, sum 0) add 0; a NaN sum stays NaN.
fn subgroup_fold(p: Part, smoothing: bool) -> Part {
    let m = subgroupMax(p.st.max);
    let s = subgroupAdd(p.st.sum * exp(p.st.max - m));
    var out = Part(RowState(m, s), 0.0, 0.0);
    if (smoothing) {
        out.aux = subgroupAdd(rebase(p.aux, p.wsum, p.st.max, m));
        out.wsum = subgroupAdd(p.wsum);
    }
    return out;
}

fn merge_row(ids: Ids, lane: u32, mine: Part) -> Part {
    if (params.threads_per_row != WG) {
        return merge_parts(ids.lid, lane, params.threads_per_row, mine, has(F_SMOOTHING));
    }
    let smoothing = has(F_SMOOTHING);
    let folded = subgroup_fold(mine, smoothing);
    if (ids.sg_lane == 0u) {
        store_part(ids.sg, folded, smoothing);
    }
    workgroupBarrier();
    // Every subgroup folds the subgroups' parts (WG / subgroup size of them, a few per
    // invocation), so the whole row's state reaches every invocation without a second
    // barrier.
    var p = Part(RowState(EMPTY_MAX, 0.0), 0.0, 0.0);
    for (var i = ids.sg_lane; i < ids.sg_count; i += ids.sg_size) {
        p = combine_parts(p, part_at(i), smoothing);
    }
    return subgroup_fold(p, smoothing);
}
