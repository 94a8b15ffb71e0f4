// What every kernel shares about its workgroups: their size and their flat index.

// Invocations per workgroup (`Tuning::workgroup_size`, a power of two), set by the host
// as a pipeline constant.
override WG: u32 = 256u;

// The flat index of a workgroup in a dispatch the host folded into 2D (`fold_groups` in
// src/gpu/buffers.rs): `groups_x` workgroups per row of the grid.
fn group_index(wid: vec3<u32>, groups_x: u32) -> u32 {
    return wid.y * groups_x + wid.x;
}
