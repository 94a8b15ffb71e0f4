// Loader of gemm.wgsl: four floats per load. The host takes it only when every
// contiguous length, stride and offset of both operands is a multiple of 4, so that
// `count` (the elements in range) is 0 or 4 and `i` a multiple of 4.

@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;

fn load_a4(i: u32, count: u32) -> vec4<f32> {
    if (count == 0u) {
        return vec4<f32>(0.0);
    }
    return a[i / 4u];
}

fn load_b4(i: u32, count: u32) -> vec4<f32> {
    if (count == 0u) {
        return vec4<f32>(0.0);
    }
    return b[i / 4u];
}
