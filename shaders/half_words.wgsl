// bfloat16 values two per u32 word, as the bf16 reader and the device path's conversions
// take them: a bf16 is the high half of an f32; stores round to nearest, ties to even.
// (IEEE binary16 has WGSL's own unpack2x16float / pack2x16float, on every adapter.)

fn unpack_bf16x2(w: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}
fn bf16_bits(x: f32) -> u32 {
    let u = bitcast<u32>(x);
    return (u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u;
}
fn pack_bf16x2(e: vec2<f32>) -> u32 { return bf16_bits(e.x) | (bf16_bits(e.y) << 16u); }
