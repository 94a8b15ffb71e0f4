// Lanes of gemm.wgsl on devices without subgroups: the builtins of its entry points, and
// stand-ins for gemm_lanes_subgroup.wgsl's lane functions, never called there (the
// broadcast tile, `TR` = 16, needs subgroups; the host never asks for it without).

struct TileIds {
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid3: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
}

fn lane_of(ids: TileIds) -> u32 {
    return 0u;
}

fn lanes8(v: vec4<f32>) -> Lanes8 {
    return Lanes8(v, v, v, v, v, v, v, v);
}
