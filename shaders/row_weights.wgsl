// Weight of each row in the `mean` denominator, from the targets alone: its target's
// class weight (1 without weights), or 0 for an ignored row. Reduced on the device before the fused
// kernel, so that a `mean` gradient over device-resident targets is scaled in the same
// pass that computes it.

#import targets
#import workgroup

struct Params {
    rows: u32,
    groups_x: u32,
    classes: u32,
    ignore_index: i32,
    has_weights: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> row_weight: array<f32>;
@group(0) @binding(3) var<storage, read> weights: array<f32>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = group_index(wid, params.groups_x) * WG + lid;
    if (r >= params.rows) {
        return;
    }
    let t = targets[r];
    let ignored = ignored_target(t, params.ignore_index, params.classes);
    var w = 0.0;
    if (!ignored) {
        w = select(1.0, weights[u32(t)], params.has_weights != 0u);
    }
    row_weight[r] = w;
}
