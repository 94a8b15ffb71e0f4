// bfloat16 logits, two per u32: the high half of an f32. Stores round to nearest, ties
// to even.

#import elem_half

@group(0) @binding(1) var<storage, read_write> logits: array<u32>;
fn unpack_elem(w: u32) -> Elem {
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}
fn bf16_bits(x: f32) -> u32 {
    let u = bitcast<u32>(x);
    return (u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u;
}
fn pack_elem(e: Elem) -> u32 { return bf16_bits(e.x) | (bf16_bits(e.y) << 16u); }
fn load_logit(i: u32) -> Elem { return unpack_elem(logits[i]); }
fn store_logit(i: u32, e: Elem) { logits[i] = pack_elem(e); }
