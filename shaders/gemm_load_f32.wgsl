// Loader of gemm.wgsl for any layout: the four elements i..i+4 of an operand, those from
// `count` on as 0. No loop: CPU adapters (llvmpipe) cap the iterations of a loop nest
// (65535, counting every inner loop's), and a loop here would count four times per load
// inside the product's K loop. Reads past the end are clamped to the last element and
// then replaced by 0.

@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

const LANES = vec4<u32>(0u, 1u, 2u, 3u);

fn load_a4(i: u32, count: u32) -> vec4<f32> {
    let last = arrayLength(&a) - 1u;
    let v = vec4<f32>(a[min(i, last)], a[min(i + 1u, last)], a[min(i + 2u, last)], a[min(i + 3u, last)]);
    return select(vec4<f32>(0.0), v, LANES < vec4<u32>(count));
}

fn load_b4(i: u32, count: u32) -> vec4<f32> {
    let last = arrayLength(&b) - 1u;
    let v = vec4<f32>(b[min(i, last)], b[min(i + 1u, last)], b[min(i + 2u, last)], b[min(i + 3u, last)]);
    return select(vec4<f32>(0.0), v, LANES < vec4<u32>(count));
}
