// Element type of the fused row kernel when V is not a multiple of 4: one f32 per load.
// The host composes the kernel with this file, elem_vec4.wgsl or a half-precision one.

#import row_state

alias Elem = f32;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(5) var<storage, read_write> grad: array<f32>;
fn load_logit(i: u32) -> Elem { return logits[i]; }
fn store_logit(i: u32, e: Elem) { logits[i] = e; }
fn store_grad(i: u32, e: Elem) { grad[i] = e; }
const WIDTH: u32 = 1u;

fn splat(x: f32) -> Elem { return x; }
fn hmax(e: Elem) -> f32 { return e; }
fn hsum(e: Elem) -> f32 { return e; }
fn lane_of(e: Elem, i: u32) -> f32 { return e; }
// 1.0 where column `first + component` is `col`, else 0.0.
fn onehot(first: u32, col: u32) -> Elem { return select(0.0, 1.0, first == col); }

fn transform(x: Elem, o: LossOpts) -> Elem { return transform1(x, o); }
fn dtransform(x: Elem, o: LossOpts) -> Elem { return dtransform1(x, o); }
// transform(x), with its derivative in `dz` (one tanh for both).
fn transform_slope(x: Elem, o: LossOpts, dz: ptr<function, Elem>) -> Elem {
    let a = transform_slope1(x, o);
    *dz = a.y;
    return a.x;
}
// Class weights [V] (binding 8; a dummy without them).
@group(0) @binding(8) var<storage, read> weights: array<f32>;
// The weight of class `t`.
fn class_weight(t: u32) -> f32 { return weights[t]; }
// Class weights of the WIDTH columns of element `c` (1 without weights).
fn weights_of(c: u32, has: bool) -> Elem {
    if (has) { return weights[c]; }
    return 1.0;
}
