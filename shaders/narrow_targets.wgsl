// 64-bit class indices (PyTorch's `long`, as little-endian (low, high) word pairs) to the
// kernels' i32, on the device: a target equal to ignore_index, or one that no i32 holds,
// becomes -1, which every kernel ignores (negative targets are never a class).

#import workgroup

struct Params {
    rows: u32,
    groups_x: u32,
    ignore_lo: u32,     // ignore_index as (low, high) words
    ignore_hi: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> wide: array<u32>;
@group(0) @binding(2) var<storage, read_write> narrow: array<i32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = group_index(wid, params.groups_x) * WG + lid;
    if (r >= params.rows) {
        return;
    }
    let lo = wide[2u * r];
    let hi = wide[2u * r + 1u];
    let ignored = lo == params.ignore_lo && hi == params.ignore_hi;
    // An i32 holds it when the high word is the sign extension of the low one.
    let fits = (hi == 0u && lo < 0x80000000u) || (hi == 0xffffffffu && lo >= 0x80000000u);
    narrow[r] = select(-1, bitcast<i32>(lo), fits && !ignored);
}
