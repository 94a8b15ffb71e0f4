// The in-run roofline: copy `count` vec4s (1 read + 1 write of every element), the
// bytes a fused loss + gradient pass must at least move. Used by `xent bench`.

#import workgroup

struct Params {
    count: u32,      // vec4s to copy
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = group_index(wid, params.groups_x);
    // Each invocation copies 4 vec4s, strided by the workgroup so accesses coalesce.
    let base = group * WG * 4u + lid;
    for (var k = 0u; k < 4u; k++) {
        let i = base + k * WG;
        if (i < params.count) {
            dst[i] = src[i];
        }
    }
}
