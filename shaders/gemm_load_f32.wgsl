// Loader of gemm.wgsl for any layout: the four elements i..i+4 of an operand, one load
// each, those from `count` on as 0.

@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

fn load_a4(i: u32, count: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < count; j++) {
        v[j] = a[i + j];
    }
    return v;
}

fn load_b4(i: u32, count: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    for (var j = 0u; j < count; j++) {
        v[j] = b[i + j];
    }
    return v;
}
