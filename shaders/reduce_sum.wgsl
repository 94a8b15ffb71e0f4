// One level of a tree sum: each workgroup adds 2 * WG consecutive values of
// `data[src ..]` as a pairwise tree and writes one partial sum to `data[dst + group]`.
// The host dispatches levels until one value is left; the last level divides by
// `divisor` (the `mean` denominator, 1 for `sum`), or by `data[divisor_index]` when
// that is set (a denominator reduced on the device). The tree shape depends only on the
// count, so the result is bit-identical run to run.

override WG: u32 = 256u;

struct Params {
    count: u32,
    src: u32,
    dst: u32,
    groups_x: u32,
    divisor: f32,
    last: u32,
    divisor_index: u32, // 0xffffffff: use `divisor`
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> data: array<f32>;

var<workgroup> part: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = wid.y * params.groups_x + wid.x;
    // A folded 2D dispatch can have a few groups past the end.
    if (g * (2u * WG) >= params.count) {
        return;
    }
    let i = g * (2u * WG) + lid;
    var v = 0.0;
    if (i < params.count) {
        v = data[params.src + i];
    }
    if (i + WG < params.count) {
        v = v + data[params.src + i + WG];
    }
    part[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            part[lid] = part[lid] + part[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        var total = part[0];
        if (params.last != 0u) {
            var d = params.divisor;
            if (params.divisor_index != 0xffffffffu) {
                d = data[params.divisor_index];
            }
            total = total / d;
        }
        data[params.dst + g] = total;
    }
}
