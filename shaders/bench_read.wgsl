// The read-only roofline: every invocation sums READS vec4s (strided by the workgroup, so
// that loads coalesce) and writes its one partial sum: 1 read of every element plus a
// write of 1/64 of the bytes, no barriers — the bytes a loss-only pass must at least
// move, at the speed the adapter moves them. Used by `xent bench`.

#import workgroup

// vec4s per invocation (`READ_VEC4S_PER_INVOCATION` on the host).
const READS: u32 = 16u;

struct Params {
    count: u32,      // vec4s to read
    groups_x: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let group = group_index(wid, params.groups_x);
    let base = group * WG * READS + lid;
    var acc = vec4<f32>(0.0);
    for (var k = 0u; k < READS; k++) {
        let i = base + k * WG;
        if (i < params.count) {
            acc += src[i];
        }
    }
    dst[group * WG + lid] = acc.x + acc.y + acc.z + acc.w;
}
