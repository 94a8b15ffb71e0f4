// The gradient of half-precision logits in f32: one vec2 per element (two columns).

#import elem_half

@group(0) @binding(5) var<storage, read_write> grad: array<vec2<f32>>;
fn store_grad(i: u32, e: Elem) { grad[i] = e; }
