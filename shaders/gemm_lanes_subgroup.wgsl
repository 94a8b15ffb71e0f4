// Lanes of gemm.wgsl on devices with subgroups (wgpu's SUBGROUP): the builtins of its
// entry points with the invocation's lane, and `lanes8`, which hands every lane the
// values of lanes 0..7 of its subgroup. The broadcast tile (`TR` = 16) uses it on CPU
// adapters whose subgroups are 8 SIMD lanes (lavapipe at 256 bits): there a broadcast
// from a constant lane is a register shuffle, while every load is a loop over the lanes.

struct TileIds {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
}

fn lane_of(ids: TileIds) -> u32 {
    return ids.lane;
}

// Called in uniform control flow, every lane of the subgroup active.
fn lanes8(v: vec4<f32>) -> Lanes8 {
    return Lanes8(subgroupBroadcast(v, 0u), subgroupBroadcast(v, 1u), subgroupBroadcast(v, 2u),
        subgroupBroadcast(v, 3u), subgroupBroadcast(v, 4u), subgroupBroadcast(v, 5u),
        subgroupBroadcast(v, 6u), subgroupBroadcast(v, 7u));
}
