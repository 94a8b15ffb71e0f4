// Element type of the row kernels when V is a multiple of 4: vec4 loads and stores.
// The host prepends this or elem_f32.wgsl (and row_state.wgsl) to the kernel.

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

// tanh_carrying_nan and sech2 (row_state.wgsl) on four lanes.
fn tanh4(u: Elem) -> Elem {
    let u2 = u * u;
    let series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0 + u2 * (-1382.0 / 155925.0 + u2 * (21844.0 / 6081075.0)))))));
    let e = exp(-2.0 * abs(u));
    let far = sign(u) * (1.0 - e) / (1.0 + e);
    return select(far, series, abs(u) < vec4<f32>(0.4));
}
fn sech2_4(u: Elem) -> Elem {
    let t = tanh4(u);
    let e = exp(-2.0 * abs(u));
    return select(4.0 * e / ((1.0 + e) * (1.0 + e)), 1.0 - t * t, abs(u) < vec4<f32>(0.4));
}
fn transform(x: Elem, o: LossOpts) -> Elem {
    let z = x * o.scale;
    if (o.softcap > 0.0) {
        return o.softcap * tanh4(z / o.softcap);
    }
    return z;
}
fn dtransform(x: Elem, o: LossOpts) -> Elem {
    if (o.softcap > 0.0) {
        return o.scale * sech2_4(x * o.scale / o.softcap);
    }
    return vec4<f32>(o.scale);
}
// Class weights of the WIDTH columns of element `c` (1 without weights).
fn weights_of(c: u32, has: bool) -> Elem {
    if (has) {
        let i = 4u * c;
        return vec4<f32>(weights[i], weights[i + 1u], weights[i + 2u], weights[i + 3u]);
    }
    return vec4<f32>(1.0);
}
