//! The row-reduction monoid of the online softmax: a running maximum and a sum of
//! `exp(x - max)`. The WGSL kernels use the same rule (`combine` in
//! `shaders/cross_entropy_rows.wgsl`); this Rust twin serves the CPU paths and host-side
//! merges of partial rows.

/// The lowest finite f32. The empty state starts its maximum here rather than at −inf, so
/// that rescaling an empty or fully masked state computes `exp(finite - finite)` and never
/// `exp(-inf - (-inf)) = NaN`.
pub const EMPTY_MAX: f32 = f32::MIN;

/// Online-softmax state of a (part of a) row: `max` and `sum = Σ exp(x - max)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowState {
    /// Running maximum (starts at [`EMPTY_MAX`]).
    pub max: f32,
    /// Sum of `exp(x - max)` over the elements seen.
    pub sum: f32,
}

impl Default for RowState {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl RowState {
    /// The identity of [`RowState::combine`].
    pub const EMPTY: RowState = RowState { max: EMPTY_MAX, sum: 0.0 };

    /// The state of one element.
    #[inline]
    pub fn of(x: f32) -> Self {
        Self::EMPTY.push(x)
    }

    /// Adds one element. A NaN or +inf element makes `sum` NaN, so the row's loss is NaN;
    /// −inf elements add 0.
    #[inline]
    pub fn push(self, x: f32) -> Self {
        let max = if x > self.max { x } else { self.max };
        RowState { max, sum: self.sum * (self.max - max).exp() + (x - max).exp() }
    }

    /// The monoid rule: the state of the concatenation of two parts.
    #[inline]
    pub fn combine(self, other: Self) -> Self {
        let max = self.max.max(other.max);
        RowState { max, sum: self.sum * (self.max - max).exp() + other.sum * (other.max - max).exp() }
    }

    /// `log Σ exp(x)`, as `max + ln(sum)`.
    #[inline]
    pub fn lse(self) -> f32 {
        self.max + self.sum.ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_matches_push_and_is_safe_for_masked_parts() {
        let xs = [1.0f32, -3.0, f32::NEG_INFINITY, 7.5, 0.25, f32::NEG_INFINITY];
        let serial = xs.iter().fold(RowState::EMPTY, |s, &x| s.push(x));
        let (a, b) = xs.split_at(3);
        let left = a.iter().fold(RowState::EMPTY, |s, &x| s.push(x));
        let right = b.iter().fold(RowState::EMPTY, |s, &x| s.push(x));
        let merged = left.combine(right);
        let exact = xs.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
        assert!((f64::from(serial.lse()) - exact).abs() < 1e-5);
        assert!((f64::from(merged.lse()) - exact).abs() < 1e-5);
        // Fully masked parts stay finite-free of NaN and act as the identity.
        let masked = RowState::EMPTY.push(f32::NEG_INFINITY).push(f32::NEG_INFINITY);
        assert_eq!(masked.sum, 0.0);
        assert_eq!(masked.combine(left), left.combine(RowState::EMPTY));
        assert_eq!(masked.lse(), f32::NEG_INFINITY);
    }

    #[test]
    fn nan_and_positive_infinity_poison_the_sum() {
        assert!(RowState::EMPTY.push(1.0).push(f32::NAN).push(2.0).sum.is_nan());
        assert!(RowState::EMPTY.push(1.0).push(f32::INFINITY).sum.is_nan());
    }
}
