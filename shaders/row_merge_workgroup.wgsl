// The row merge of cross_entropy_rows.wgsl on adapters without subgroups: the
// workgroup-memory tree for every row layout.

struct Ids {
    @builtin(local_invocation_index) lid: u32,
}

fn merge_row(ids: Ids, lane: u32, mine: Part) -> Part {
    return merge_tree(ids.lid, lane, mine);
}
