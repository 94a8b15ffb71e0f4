// The evaluation metrics reduced on the device, in a fixed order (bit-identical run to
// run): levels of sums, the first over the rows' records (`metrics_record` of
// row_metrics.wgsl: two vec4<u32> a row), the next ones over the previous level's
// entries, each invocation adding IN_ROWS consecutive rows or IN consecutive entries for
// one group of BIN_GROUP calibration bins (the group-0 invocation also adds the head):
// an entry is (16 + 4 B) words, so rows go in by the thousand and the entries of a
// chunk stay smaller than its records. Counts are exact u32 sums; float
// sums are f32 with a Kahan compensation, carried in the entry, so no long serial chain
// loses precision. Host twin: `MetricSums` in src/metrics.rs (push and add); the host
// reads the last entry (src/gpu/metrics.rs).
//
// An entry (u32 words; floats as their bits): HEAD words
//   counted, correct, top-k counts (MAX_K), nll sum, its compensation, entropy sum, its
//   compensation, 0, 0
// then four words per bin: count, correct, confidence sum, its compensation.

#import row_metrics
#import workgroup

const MAX_K: u32 = 8u;
const HEAD: u32 = 16u;
const BIN_GROUP: u32 = 16u;
const IN: u32 = 64u;
const IN_ROWS: u32 = 1024u;

struct Params {
    count: u32,       // inputs of this level
    from_rows: u32,   // 1: the inputs are row records (level 0); 0: entries
    src: u32,         // first input: a row of `records`, or an entry of `entries`
    dst: u32,         // entry of this level's first output
    bins: u32,        // calibration bins B
    k_count: u32,     // top-k values in use (<= MAX_K)
    groups_x: u32,
    _pad: u32,
    // The asked k of the top-k accuracies, ascending (k_count of them).
    k0: u32,
    k1: u32,
    k2: u32,
    k3: u32,
    k4: u32,
    k5: u32,
    k6: u32,
    k7: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> records: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read_write> entries: array<u32>;

struct Kahan {
    s: f32,
    c: f32,
}

// s + x with the running compensation c; an infinite or NaN sum keeps c at 0 (the sum
// stays inf or NaN, as an f64 sum would).
fn kahan_add(k: Kahan, x: f32) -> Kahan {
    let y = x - k.c;
    let t = k.s + y;
    let finite = (bitcast<u32>(t) & 0x7f800000u) != 0x7f800000u;
    return Kahan(t, select(0.0, (t - k.s) - y, finite));
}

// Another compensated sum (s, c) added: s, then −c.
fn kahan_merge(k: Kahan, s: f32, c: f32) -> Kahan {
    return kahan_add(kahan_add(k, s), -c);
}

fn word_f(i: u32) -> f32 {
    return bitcast<f32>(entries[i]);
}

// The bin of a confidence: min(floor(confidence · B), B − 1) in f32 (as
// `MetricSums::bin_of`); a NaN confidence goes to bin 0.
fn bin_of(confidence: f32) -> u32 {
    let b = floor(confidence * f32(params.bins));
    let nan = nan_bits(confidence);
    return select(min(u32(max(b, 0.0)), params.bins - 1u), 0u, nan);
}

fn k_at(q: u32) -> u32 {
    var ks = array<u32, MAX_K>(params.k0, params.k1, params.k2, params.k3, params.k4, params.k5, params.k6, params.k7);
    return ks[q];
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, params.groups_x) * WG + lid;
    let groups = (params.bins + BIN_GROUP - 1u) / BIN_GROUP;
    let out = i / groups;
    let g = i % groups;
    let fan = select(IN, IN_ROWS, params.from_rows != 0u);
    if (out >= (params.count + fan - 1u) / fan) {
        return;
    }
    let words = HEAD + 4u * params.bins;
    let b0 = g * BIN_GROUP;
    let head = g == 0u;
    var counted = 0u;
    var correct = 0u;
    var topk: array<u32, MAX_K>;
    var nll = Kahan(0.0, 0.0);
    var ent = Kahan(0.0, 0.0);
    var bin_n: array<u32, BIN_GROUP>;
    var bin_ok: array<u32, BIN_GROUP>;
    var bin_conf: array<Kahan, BIN_GROUP>;
    let first = out * fan;
    let last = min(first + fan, params.count);
    for (var j = first; j < last; j++) {
        if (params.from_rows != 0u) {
            let a = records[2u * (params.src + j)];
            let b = records[2u * (params.src + j) + 1u];
            let scored = bitcast<i32>(b.y);
            if (scored < 0) {
                continue; // an ignored row
            }
            let pred = bitcast<i32>(a.x);
            let above = a.y;
            let confidence = bitcast<f32>(a.z);
            let ok = pred >= 0 && pred == scored;
            counted += 1u;
            correct += u32(ok);
            for (var q = 0u; q < MAX_K; q++) {
                topk[q] += u32(q < params.k_count && pred >= 0 && above < k_at(q));
            }
            nll = kahan_add(nll, bitcast<f32>(b.x));
            ent = kahan_add(ent, bitcast<f32>(a.w));
            let bin = bin_of(confidence);
            for (var q = 0u; q < BIN_GROUP; q++) {
                if (bin == b0 + q) {
                    bin_n[q] += 1u;
                    bin_ok[q] += u32(ok);
                    bin_conf[q] = kahan_add(bin_conf[q], confidence);
                }
            }
        } else {
            let e = (params.src + j) * words;
            if (head) {
                counted += entries[e];
                correct += entries[e + 1u];
                for (var q = 0u; q < MAX_K; q++) {
                    topk[q] += entries[e + 2u + q];
                }
                nll = kahan_merge(nll, word_f(e + 10u), word_f(e + 11u));
                ent = kahan_merge(ent, word_f(e + 12u), word_f(e + 13u));
            }
            for (var q = 0u; q < BIN_GROUP; q++) {
                if (b0 + q < params.bins) {
                    let w = e + HEAD + 4u * (b0 + q);
                    bin_n[q] += entries[w];
                    bin_ok[q] += entries[w + 1u];
                    bin_conf[q] = kahan_merge(bin_conf[q], word_f(w + 2u), word_f(w + 3u));
                }
            }
        }
    }
    let o = (params.dst + out) * words;
    if (head) {
        entries[o] = counted;
        entries[o + 1u] = correct;
        for (var q = 0u; q < MAX_K; q++) {
            entries[o + 2u + q] = topk[q];
        }
        entries[o + 10u] = bitcast<u32>(nll.s);
        entries[o + 11u] = bitcast<u32>(nll.c);
        entries[o + 12u] = bitcast<u32>(ent.s);
        entries[o + 13u] = bitcast<u32>(ent.c);
        entries[o + 14u] = 0u;
        entries[o + 15u] = 0u;
    }
    for (var q = 0u; q < BIN_GROUP; q++) {
        if (b0 + q < params.bins) {
            let w = o + HEAD + 4u * (b0 + q);
            entries[w] = bin_n[q];
            entries[w + 1u] = bin_ok[q];
            entries[w + 2u] = bitcast<u32>(bin_conf[q].s);
            entries[w + 3u] = bitcast<u32>(bin_conf[q].c);
        }
    }
}
