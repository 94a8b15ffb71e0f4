// The row merge of cross_entropy_rows.wgsl on adapters without subgroups: the
// workgroup-memory tree (part_tree.wgsl) for every row layout.

#import part_tree

struct Ids {
    @builtin(local_invocation_index) lid: u32,
}

fn merge_row(ids: Ids, lane: u32, mine: Merged) -> Merged {
    return merge_parts_seen(ids.lid, lane, params.threads_per_row, mine, has(F_SMOOTHING), has(F_METRICS));
}
