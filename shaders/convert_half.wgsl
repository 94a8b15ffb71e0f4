// The device-resident path's conversions between a caller's buffer of 16-bit floats (two
// per u32 word, f16 or bf16) and an f32 buffer, at any element offset, so that rows of
// an odd number of classes (which start in the middle of a word) and the kernels that
// read f32 only take half-precision logits:
// - MODE_WIDEN: wide[i] = half element `first + i` of `words`, for i < count.
// - MODE_NARROW: half element `first + i` = wide[i], rounded once. Each invocation writes
//   one whole word; a word at either end of the range keeps its other half as it was
//   (bit for bit), so consecutive ranges may share a word.
// - MODE_COPY: words[first + i] = the bits of wide[i] (an f32 gradient over f32 logits).
// Invocations stride over the range, so one dispatch of any size covers it.

#import half_words
#import workgroup

const MODE_WIDEN: u32 = 0u;
const MODE_NARROW: u32 = 1u;
const MODE_COPY: u32 = 2u;
// `flags` bit: the 16-bit values are bf16 (else IEEE binary16).
const FLAG_BF16: u32 = 4u;

struct Params {
    first: u32,     // element of `words` (16-bit; 32-bit for MODE_COPY) at wide[0]
    count: u32,     // elements
    groups_x: u32,
    flags: u32,     // MODE_* | FLAG_BF16
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> words: array<u32>;
@group(0) @binding(2) var<storage, read_write> wide: array<f32>;

fn unpack(w: u32, bf16: bool) -> vec2<f32> {
    if (bf16) {
        return unpack_bf16x2(w);
    }
    return unpack2x16float(w);
}

fn pack(e: vec2<f32>, bf16: bool) -> u32 {
    if (bf16) {
        return pack_bf16x2(e);
    }
    return pack2x16float(e);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let start = group_index(wid, params.groups_x) * WG + lid;
    let stride = nwg.x * nwg.y * WG;
    let mode = params.flags & 3u;
    let bf16 = (params.flags & FLAG_BF16) != 0u;
    let first = params.first;
    let end = first + params.count;
    if (mode == MODE_WIDEN) {
        for (var i = start; i < params.count; i += stride) {
            let e = first + i;
            wide[i] = unpack(words[e / 2u], bf16)[e % 2u];
        }
    } else if (mode == MODE_NARROW) {
        let w0 = first / 2u;
        let words_in_range = (end + 1u) / 2u - w0;
        for (var k = start; k < words_in_range; k += stride) {
            let w = w0 + k;
            let lo = 2u * w;
            let lo_in = lo >= first && lo < end;
            let hi_in = lo + 1u >= first && lo + 1u < end;
            var v = vec2<f32>(0.0);
            if (lo_in) {
                v.x = wide[lo - first];
            }
            if (hi_in) {
                v.y = wide[lo + 1u - first];
            }
            let packed = pack(v, bf16);
            let mask = select(0u, 0xffffu, lo_in) | select(0u, 0xffff0000u, hi_in);
            var old = 0u;
            if (mask != 0xffffffffu) {
                old = words[w];
            }
            words[w] = (packed & mask) | (old & ~mask);
        }
    } else {
        for (var i = start; i < params.count; i += stride) {
            words[first + i] = bitcast<u32>(wide[i]);
        }
    }
}
