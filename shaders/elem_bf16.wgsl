// bfloat16 logits, two per u32: the high half of an f32 (half_words.wgsl). Stores round
// to nearest, ties to even.

#import elem_half
#import half_words

@group(0) @binding(1) var<storage, read_write> logits: array<u32>;
fn unpack_elem(w: u32) -> Elem { return unpack_bf16x2(w); }
fn pack_elem(e: Elem) -> u32 { return pack_bf16x2(e); }
fn load_logit(i: u32) -> Elem { return unpack_elem(logits[i]); }
fn store_logit(i: u32, e: Elem) { logits[i] = pack_elem(e); }
