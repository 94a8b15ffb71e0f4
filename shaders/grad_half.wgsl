// The gradient of half-precision logits in their own format, packed as they are
// (`pack_elem` of elem_f16.wgsl, elem_f16_native.wgsl or elem_bf16.wgsl).

#import elem_half

@group(0) @binding(5) var<storage, read_write> grad: array<u32>;
fn store_grad(i: u32, e: Elem) { grad[i] = pack_elem(e); }
