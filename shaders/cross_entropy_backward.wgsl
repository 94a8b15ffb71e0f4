// Gradient of cross-entropy from saved row statistics (row_state.wgsl is prepended):
// `(exp((x - max) - log_sum) - onehot) * scale / norm[0]`, over a grid of
// (row, column block) workgroups, so that few long rows still fill the device.
// Reads each logit once and writes each gradient once, to `grad` or over the logits.
//
// Row statistics are (max, log(sum)) pairs rather than LSE: under large offsets
// max + log(sum) rounds in f32 and exp(x - lse) would lose digits.

override WG: u32 = 256u;

const GRAD_SEPARATE: u32 = 1u;
const GRAD_IN_PLACE: u32 = 2u;

struct Params {
    rows: u32,          // rows in this dispatch
    row_stride: u32,    // elements between consecutive rows in `logits` / `grad`
    cols: u32,          // columns of each row in this dispatch (<= row_stride)
    col_base: u32,      // global class index of column 0 (target matching)
    block_cols: u32,    // columns per workgroup
    blocks: u32,        // column blocks per row
    row_base: u32,      // global row of row 0 in `targets` and `row_stats`
    groups_x: u32,      // x size of the (folded) 2D dispatch
    scale: f32,         // upstream gradient
    grad_mode: u32,
    ignore_index: i32,
    classes: u32,       // V: targets outside [0, V) are treated as ignored
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<i32>;
@group(0) @binding(3) var<storage, read> row_stats: array<vec2<f32>>;
// The `mean` denominator (1 for sum/none), possibly computed on the device.
@group(0) @binding(4) var<storage, read> norm: array<f32>;
@group(0) @binding(5) var<storage, read_write> grad: array<f32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let g = wid.y * params.groups_x + wid.x;
    let r = g / params.blocks;
    if (r >= params.rows) {
        return;
    }
    let first = (g % params.blocks) * params.block_cols;
    let last = min(first + params.block_cols, params.cols);
    let base = r * params.row_stride;
    let t = targets[params.row_base + r];
    let ignored = t == params.ignore_index || t < 0 || u32(t) >= params.classes;
    let tc = select(u32(t) - params.col_base, 0xffffffffu, ignored || u32(t) < params.col_base);
    let stats = row_stats[params.row_base + r];
    let scale = params.scale / norm[0];
    for (var c = first + lid; c < last; c += WG) {
        var g = 0.0;
        if (!ignored) {
            var p = exp((logits[base + c] - stats.x) - stats.y);
            if (c == tc) {
                p = p - 1.0;
            }
            g = p * scale;
        }
        if (params.grad_mode == GRAD_IN_PLACE) {
            logits[base + c] = g;
        } else {
            grad[base + c] = g;
        }
    }
}
