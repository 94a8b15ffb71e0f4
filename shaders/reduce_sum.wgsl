// One level of a tree sum: each workgroup adds 2 * WG consecutive values of
// `data[src ..]` as a pairwise tree and writes one partial sum to `data[dst + group]`.
// The host dispatches levels until one value is left; the last level divides by
// `divisor` (the `mean` denominator, 1 for `sum`), or by `data[divisor_index]` when
// that is set (a denominator reduced on the device). The tree shape depends only on the
// count, so the result is bit-identical run to run.

#import workgroup
#import workgroup_sum

// `divisor_index` meaning "use `divisor`" (`NO_INDEX` on the host).
const NO_INDEX: u32 = 0xffffffffu;

struct Params {
    count: u32,
    src: u32,
    dst: u32,
    groups_x: u32,
    divisor: f32,
    last: u32,
    divisor_index: u32, // NO_INDEX: use `divisor`
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> data: array<f32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = group_index(wid, params.groups_x);
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
    var total = workgroup_sum(lid, v);
    if (lid == 0u) {
        if (params.last != 0u) {
            var d = params.divisor;
            if (params.divisor_index != NO_INDEX) {
                d = data[params.divisor_index];
            }
            total = total / d;
        }
        data[params.dst + g] = total;
    }
}
