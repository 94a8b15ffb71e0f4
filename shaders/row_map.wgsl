// Per-row values of the device-resident path, from per-row f32 arrays:
// - MODE_STATS: (out[2r], out[2r + 1]) = (a[r], 1), the (max, sum) statistics of a
//   saved LSE a[r], as cross_entropy_backward.wgsl reads them.
// - MODE_Z_SPLIT: with a the LSE, b the row losses (z-loss included) and c each row's
//   count (1 counted, 0 ignored): out[r] = b[r] - z_r and out[rows + r] = z_r, where
//   z_r = scale · a[r]² for a counted row and 0 otherwise — the cross-entropy and z-loss
//   parts, which `mean` divides by different denominators (shared/docs/semantics.md).

#import workgroup

const MODE_STATS: u32 = 0u;
const MODE_Z_SPLIT: u32 = 1u;

struct Params {
    rows: u32,
    groups_x: u32,
    mode: u32,      // MODE_*
    scale: f32,     // the z-loss scale s
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> c: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = group_index(wid, params.groups_x) * WG + lid;
    if (r >= params.rows) {
        return;
    }
    if (params.mode == MODE_STATS) {
        out[2u * r] = a[r];
        out[2u * r + 1u] = 1.0;
    } else {
        var z = 0.0;
        if (c[r] != 0.0) {
            z = params.scale * a[r] * a[r];
        }
        out[r] = b[r] - z;
        out[params.rows + r] = z;
    }
}
