// Element type of the fused row kernel for half-precision logits: two 16-bit values
// packed in each u32 (V even), computed in f32 as vec2. Imported by elem_f16.wgsl,
// elem_f16_native.wgsl and elem_bf16.wgsl, which declare the logits and how to load and
// pack them; grad_f32x2.wgsl or grad_half.wgsl declares the gradient.

#import row_state

alias Elem = vec2<f32>;
const WIDTH: u32 = 2u;

fn splat(x: f32) -> Elem { return vec2<f32>(x); }
fn hmax(e: Elem) -> f32 { return max(e.x, e.y); }
fn hsum(e: Elem) -> f32 { return e.x + e.y; }
fn lane_of(e: Elem, i: u32) -> f32 { return e[i]; }
// 1.0 where column `first + component` is `col`, else 0.0.
fn onehot(first: u32, col: u32) -> Elem {
    return select(vec2<f32>(0.0), vec2<f32>(1.0), vec2<u32>(first) + vec2<u32>(0u, 1u) == vec2<u32>(col));
}
// transform1 and dtransform1 (row_state.wgsl) on each lane.
fn transform(x: Elem, o: LossOpts) -> Elem {
    return vec2<f32>(transform1(x.x, o), transform1(x.y, o));
}
fn dtransform(x: Elem, o: LossOpts) -> Elem {
    return vec2<f32>(dtransform1(x.x, o), dtransform1(x.y, o));
}
// transform(x), with its derivative in `dz` (one tanh per lane for both).
fn transform_slope(x: Elem, o: LossOpts, dz: ptr<function, Elem>) -> Elem {
    let a = transform_slope1(x.x, o);
    let b = transform_slope1(x.y, o);
    *dz = vec2<f32>(a.y, b.y);
    return vec2<f32>(a.x, b.x);
}
// Class weights [V] (binding 8; a dummy without them).
@group(0) @binding(8) var<storage, read> weights: array<vec2<f32>>;
// The weight of class `t`.
fn class_weight(t: u32) -> f32 { return weights[t / 2u][t % 2u]; }
// Class weights of the two columns of element `c` (1 without weights).
fn weights_of(c: u32, has: bool) -> Elem {
    if (has) {
        return weights[c];
    }
    return vec2<f32>(1.0);
}
