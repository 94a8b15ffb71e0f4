// The row merge of cross_entropy_rows.wgsl on devices with subgroups (wgpu's SUBGROUP).
// When one row fills the workgroup (long rows, the case where the merge costs most),
// each subgroup folds its states with subgroupMax and subgroupAdd (the `combine` rule
// applied to the whole subgroup at once: sum of s * exp(max - M) with M the subgroup's
// max), and one barrier later every invocation folds the subgroups' states from
// workgroup memory: 1 barrier instead of log2(WG). Several rows per workgroup take the
// tree (merge_tree): a subgroup may span rows, and nothing guarantees which invocations
// form one.

struct Ids {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) sg_count: u32,
}

fn merge_row(ids: Ids, lane: u32, st: RowState, aux: f32, wsum: f32) -> Merged {
    if (params.threads_per_row != WG) {
        return merge_tree(ids.lid, lane, st, aux, wsum);
    }
    let smoothing = has(F_SMOOTHING);
    // Empty states (max EMPTY_MAX, sum 0) add 0; a NaN sum stays NaN.
    let m = subgroupMax(st.max);
    let s = subgroupAdd(st.sum * exp(st.max - m));
    var a = 0.0;
    var w = 0.0;
    if (smoothing) {
        a = subgroupAdd(rebase(aux, wsum, st.max, m));
        w = subgroupAdd(wsum);
    }
    if (ids.sg_lane == 0u) {
        wg_max[ids.sg] = m;
        wg_sum[ids.sg] = s;
        wg_aux[ids.sg] = a;
        wg_wsum[ids.sg] = w;
    }
    workgroupBarrier();
    // Every invocation folds the few subgroup states itself (WG / subgroup size of them),
    // in the same order, so all agree bit for bit.
    var out = RowState(wg_max[0], wg_sum[0]);
    var out_aux = wg_aux[0];
    var out_wsum = wg_wsum[0];
    for (var i = 1u; i < ids.sg_count; i++) {
        let b = RowState(wg_max[i], wg_sum[i]);
        let c = combine(out, b);
        if (smoothing) {
            out_aux = rebase(out_aux, out_wsum, out.max, c.max) + rebase(wg_aux[i], wg_wsum[i], b.max, c.max);
            out_wsum += wg_wsum[i];
        }
        out = c;
    }
    return Merged(out, out_aux);
}
