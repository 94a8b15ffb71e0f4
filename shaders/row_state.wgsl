// The online-softmax monoid and the loss options, shared by every row kernel
// (`#import row_state`). The Rust twin is `xent::RowState` in src/row_state.rs.

// Lowest finite f32: the empty state's max. Starting at -inf would make the first
// rescale exp(-inf - (-inf)) = NaN for masked (-inf) entries.
const EMPTY_MAX: f32 = -3.40282347e38;

struct RowState {
    max: f32,
    sum: f32,
}

fn combine(a: RowState, b: RowState) -> RowState {
    let m = max(a.max, b.max);
    return RowState(m, a.sum * exp(a.max - m) + b.sum * exp(b.max - m));
}

// A state with its label-smoothing sums: aux = Σ w_c (max - z_c) relative to the state's
// own max, wsum = Σ w_c. Every aux term is >= 0, so masked (-inf) classes give +inf,
// never inf - inf.
struct Part {
    st: RowState,
    aux: f32,
    wsum: f32,
}

// aux relative to `old_max`, moved to `new_max` (>= old_max). An empty part
// (wsum 0, max still EMPTY_MAX) stays 0 rather than 0 * inf.
fn rebase(aux: f32, wsum: f32, old_max: f32, new_max: f32) -> f32 {
    return aux + select(0.0, wsum * (new_max - old_max), wsum > 0.0);
}

// `combine` for parts. Without smoothing the sums stay 0 (and their loads fold away).
fn combine_parts(a: Part, b: Part, smoothing: bool) -> Part {
    let st = combine(a.st, b.st);
    if (!smoothing) {
        return Part(st, 0.0, 0.0);
    }
    return Part(st, rebase(a.aux, a.wsum, a.st.max, st.max) + rebase(b.aux, b.wsum, b.st.max, st.max),
        a.wsum + b.wsum);
}

// `a` with one more transformed logit z of class weight w (w matters only with smoothing).
fn push_part(a: Part, z: f32, w: f32, smoothing: bool) -> Part {
    let m = max(a.st.max, z);
    let st = RowState(m, a.st.sum * exp(a.st.max - m) + exp(z - m));
    if (!smoothing) {
        return Part(st, 0.0, 0.0);
    }
    return Part(st, rebase(a.aux, a.wsum, a.st.max, m) + w * (m - z), a.wsum + w);
}

// What the evaluation metrics keep of a part of a row beside its state (row_metrics.wgsl):
// the first column holding the part's max (NO_ARG: none), its elements above the target's
// logit (exact below 2^24), the spread Σ exp(z − max) (z − max) relative to the part's
// max, and whether it holds a NaN. The Rust twin is `RowMetrics::from_stats`.
struct Seen {
    arg: u32,
    above: f32,
    spread: f32,
    nan: u32,
}

const NO_ARG: u32 = 0xffffffffu;
const NO_SEEN: Seen = Seen(NO_ARG, 0.0, 0.0, 0u);

// A spread relative to `st.max`, moved to `m` (>= st.max) as the sum is: an empty part
// stays 0, and so does a part whose terms vanish at the new max (f = 0, where
// st.max − m may be −inf: 0 · −inf would be NaN).
fn rebase_spread(st: RowState, spread: f32, m: f32) -> f32 {
    let f = exp(st.max - m);
    return select(0.0, f * (spread + st.sum * (st.max - m)), st.sum > 0.0 && f > 0.0);
}

// `combine` for the metrics of two parts with states `a` and `b` (given in column order):
// the argmax of the larger max, the lower column on equal maxima.
fn combine_seen(a: RowState, sa: Seen, b: RowState, sb: Seen) -> Seen {
    let m = max(a.max, b.max);
    let arg = select(select(min(sa.arg, sb.arg), sa.arg, a.max > b.max), sb.arg, b.max > a.max);
    return Seen(arg, sa.above + sb.above, rebase_spread(a, sa.spread, m) + rebase_spread(b, sb.spread, m),
        max(sa.nan, sb.nan));
}

// The loss options every row kernel shares (each kernel fills one from its parameters).
struct LossOpts {
    scale: f32,         // logit scale α
    softcap: f32,       // c, or 0 for none
    eps: f32,           // label smoothing ε
    z_loss: f32,        // z-loss scale s
    z_grad: f32,        // s in the gradient: s · D / D_z under `mean` with class weights
    weight_total: f32,  // W = Σ_c w_c (V without weights)
    classes: u32,       // V
}

// The one tanh of the library, with 1 - tanh^2 from the same exp (the vector element
// types apply it per lane): (tanh(u), 1 - tanh(u)^2). From exp, which carries NaN through
// on every backend we test (a driver's tanh need not: GL's returns a number for NaN): an
// odd series for |u| < 0.4, where 1 - exp would cancel, and sign(u) (1 - e) / (1 + e) with
// e = exp(-2|u|) elsewhere (±1 at ±inf); the slope there is 4e / (1 + e)^2, without the
// cancellation of 1 - t^2 near |t| = 1.
fn tanh_slope(u: f32) -> vec2<f32> {
    let u2 = u * u;
    let series = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0 + u2 * (-1382.0 / 155925.0 + u2 * (21844.0 / 6081075.0)))))));
    let e = exp(-2.0 * abs(u));
    let r = 1.0 / (1.0 + e);
    let far = vec2<f32>(sign(u) * (1.0 - e) * r, 4.0 * e * r * r);
    return select(far, vec2<f32>(series, 1.0 - series * series), abs(u) < 0.4);
}

// The logit the loss sees and its derivative: (z, dz/dx) with z = α x, then c · tanh(α x / c)
// with a softcap. One tanh serves both (the gradient passes need both).
fn transform_slope1(x: f32, o: LossOpts) -> vec2<f32> {
    let z = x * o.scale;
    if (o.softcap > 0.0) {
        // x · (1/c): the reciprocal is the same for every element (hoisted out of the
        // loops), a division per element is not.
        let t = tanh_slope(z * (1.0 / o.softcap));
        return vec2<f32>(o.softcap * t.x, o.scale * t.y);
    }
    return vec2<f32>(z, o.scale);
}

// The logit the loss sees.
fn transform1(x: f32, o: LossOpts) -> f32 {
    return transform_slope1(x, o).x;
}

// d(transform1)/dx.
fn dtransform1(x: f32, o: LossOpts) -> f32 {
    return transform_slope1(x, o).y;
}

// A counted row's loss from its statistics: the target term, label smoothing with
// smooth_sum = Σ_c w_c (max − z_c), and z-loss. (max − z) first, log(sum) last: exact under
// large offsets.
fn row_loss_of(o: LossOpts, m: f32, log_s: f32, z_t: f32, w_y: f32, smooth_sum: f32) -> f32 {
    var loss = (1.0 - o.eps) * w_y * ((m - z_t) + log_s);
    if (o.eps > 0.0) {
        loss += o.eps / f32(o.classes) * (smooth_sum + o.weight_total * log_s);
    }
    if (o.z_loss > 0.0) {
        let l = m + log_s;
        loss += o.z_loss * l * l;
    }
    return loss;
}

// d loss / d z_j = p_j · k − (ε/V) w_j − (1 − ε) w_y δ_jy: this is k.
fn grad_k(o: LossOpts, m: f32, log_s: f32, w_y: f32) -> f32 {
    var k = (1.0 - o.eps) * w_y;
    if (o.eps > 0.0) {
        k += o.eps / f32(o.classes) * o.weight_total;
    }
    if (o.z_loss > 0.0) {
        k += 2.0 * o.z_grad * (m + log_s);
    }
    return k;
}
