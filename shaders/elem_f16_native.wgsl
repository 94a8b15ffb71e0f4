// IEEE binary16 logits as WGSL `f16`, for adapters with SHADER_F16: two per 32-bit word
// as vec2<f16>, widened to f32 for the arithmetic. (The composer moves `enable` to the
// top of the module.)

enable f16;

#import elem_half

@group(0) @binding(1) var<storage, read_write> logits: array<vec2<f16>>;
fn load_logit(i: u32) -> Elem { return vec2<f32>(logits[i]); }
fn store_logit(i: u32, e: Elem) { logits[i] = vec2<f16>(e); }
fn pack_elem(e: Elem) -> u32 { return pack2x16float(e); }
