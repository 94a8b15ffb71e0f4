// The read-only roofline: sum `count` vec4s (1 read of every element) into one value per
// workgroup, the bytes a loss-only pass must at least move. Used by `xent bench`.

override WG: u32 = 256u;

struct Params {
    count: u32,      // vec4s to read
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

var<workgroup> part: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = wid.y * params.groups_x + wid.x;
    let base = group * WG * 4u + lid;
    var acc = vec4<f32>(0.0);
    for (var k = 0u; k < 4u; k++) {
        let i = base + k * WG;
        if (i < params.count) {
            acc += src[i];
        }
    }
    part[lid] = acc.x + acc.y + acc.z + acc.w;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            part[lid] += part[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        dst[group] = part[0];
    }
}
