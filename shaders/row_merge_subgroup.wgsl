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

// The subgroup's metrics (`Seen`) of parts with states `st`, combined: the same rule as
// `combine_seen`, over the whole subgroup at once.
fn subgroup_fold_seen(st: RowState, s: Seen) -> Seen {
    let m = subgroupMax(st.max);
    return Seen(subgroupMin(select(NO_ARG, s.arg, st.max == m)), subgroupAdd(s.above),
        subgroupAdd(rebase_spread(st, s.spread, m)), subgroupMax(s.nan));
}

fn merge_row(ids: Ids, lane: u32, mine: Merged) -> Merged {
    let smoothing = has(F_SMOOTHING);
    let metrics = has(F_METRICS);
    if (params.threads_per_row != WG) {
        return merge_parts_seen(ids.lid, lane, params.threads_per_row, mine, smoothing, metrics);
    }
    let folded = subgroup_fold(mine.part, smoothing);
    var seen = NO_SEEN;
    if (metrics) {
        seen = subgroup_fold_seen(mine.part.st, mine.seen);
    }
    if (ids.sg_lane == 0u) {
        store_part(ids.sg, folded, smoothing);
        if (metrics) {
            store_seen(ids.sg, seen);
        }
    }
    workgroupBarrier();
    // Every subgroup folds the subgroups' parts (WG / subgroup size of them, a few per
    // invocation), so the whole row's state reaches every invocation without a second
    // barrier.
    var p = Part(RowState(EMPTY_MAX, 0.0), 0.0, 0.0);
    var s = NO_SEEN;
    for (var i = ids.sg_lane; i < ids.sg_count; i += ids.sg_size) {
        let q = part_at(i);
        if (metrics) {
            s = combine_seen(p.st, s, q.st, seen_at(i));
        }
        p = combine_parts(p, q, smoothing);
    }
    var out = Merged(subgroup_fold(p, smoothing), NO_SEEN);
    if (metrics) {
        out.seen = subgroup_fold_seen(p.st, s);
    }
    return out;
}
