// Element type of the fused row kernel when V is a multiple of 4: vec4 loads and stores.
// The host composes the kernel with this file, elem_f32.wgsl or a half-precision one.

#import row_state

alias Elem = vec4<f32>;
@group(0) @binding(1) var<storage, read_write> logits: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> grad: array<vec4<f32>>;
fn load_logit(i: u32) -> Elem { return logits[i]; }
fn store_logit(i: u32, e: Elem) { logits[i] = e; }
fn store_grad(i: u32, e: Elem) { grad[i] = e; }
const WIDTH: u32 = 4u;

fn splat(x: f32) -> Elem { return vec4<f32>(x); }
fn hmax(e: Elem) -> f32 { return max(max(e.x, e.y), max(e.z, e.w)); }
fn hsum(e: Elem) -> f32 { return (e.x + e.y) + (e.z + e.w); }
fn lane_of(e: Elem, i: u32) -> f32 { return e[i]; }
// 1.0 where column `first + component` is `col`, else 0.0.
fn onehot(first: u32, col: u32) -> Elem {
    return select(vec4<f32>(0.0), vec4<f32>(1.0), vec4<u32>(first) + vec4<u32>(0u, 1u, 2u, 3u) == vec4<u32>(col));
}
// transform1 and dtransform1 (row_state.wgsl) on each lane.
fn transform(x: Elem, o: LossOpts) -> Elem {
    return vec4<f32>(transform1(x.x, o), transform1(x.y, o), transform1(x.z, o), transform1(x.w, o));
}
fn dtransform(x: Elem, o: LossOpts) -> Elem {
    return vec4<f32>(dtransform1(x.x, o), dtransform1(x.y, o), dtransform1(x.z, o), dtransform1(x.w, o));
}
// transform(x), with its derivative in `dz` (one tanh per lane for both).
fn transform_slope(x: Elem, o: LossOpts, dz: ptr<function, Elem>) -> Elem {
    let a = transform_slope1(x.x, o);
    let b = transform_slope1(x.y, o);
    let c = transform_slope1(x.z, o);
    let d = transform_slope1(x.w, o);
    *dz = vec4<f32>(a.y, b.y, c.y, d.y);
    return vec4<f32>(a.x, b.x, c.x, d.x);
}
// Class weights [V] (binding 8; a dummy without them).
@group(0) @binding(8) var<storage, read> weights: array<vec4<f32>>;
// The weight of class `t`.
fn class_weight(t: u32) -> f32 { return weights[t / 4u][t % 4u]; }
// Class weights of the WIDTH columns of element `c` (1 without weights).
fn weights_of(c: u32, has: bool) -> Elem {
    if (has) {
        return weights[c];
    }
    return vec4<f32>(1.0);
}
