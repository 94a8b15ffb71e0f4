// The online-softmax monoid, shared by every row kernel (prepended by the host; see
// src/gpu/kernels.rs). The Rust twin is `xent::RowState` in src/row_state.rs.

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

fn push(s: RowState, x: f32) -> RowState {
    let m = max(s.max, x);
    return RowState(m, s.sum * exp(s.max - m) + exp(x - m));
}
