// IEEE binary16 logits, two per u32, unpacked with unpack2x16float (every adapter).

#import elem_half

@group(0) @binding(1) var<storage, read_write> logits: array<u32>;
fn unpack_elem(w: u32) -> Elem { return unpack2x16float(w); }
fn pack_elem(e: Elem) -> u32 { return pack2x16float(e); }
fn load_logit(i: u32) -> Elem { return unpack_elem(logits[i]); }
fn store_logit(i: u32, e: Elem) { logits[i] = pack_elem(e); }
