//! The linear head's shared fixture: a deterministic head h, W, b and targets.

use xent::{HalfFormat, LinearHead, Values};

/// A deterministic head: h [n, d], W [v, d], b [v], targets with every 7th row ignored
/// (-100) and the rest spread over the classes.
pub struct Head {
    pub n: usize,
    pub d: usize,
    pub v: usize,
    pub h: Vec<f32>,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
    pub t: Vec<i64>,
}

pub fn head(n: usize, d: usize, v: usize, seed: u64) -> Head {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    };
    let h = (0..n * d).map(|_| (u() * 1.5) as f32).collect();
    let w = (0..v * d).map(|_| (u() * 0.8) as f32).collect();
    let b = (0..v).map(|_| (u() * 0.5) as f32).collect();
    let t = (0..n).map(|r| if r % 7 == 3 { -100 } else { ((r * 31 + 5) % v) as i64 }).collect();
    Head { n, d, v, h, w, b, t }
}

impl Head {
    pub fn linear(&self, bias: bool) -> LinearHead<'_> {
        let head = LinearHead::new(Values::F32(&self.h), Values::F32(&self.w), self.d);
        if bias { head.bias(Values::F32(&self.b)) } else { head }
    }
    /// The logits in f64, rounded once to f32.
    pub fn logits(&self, bias: bool) -> Vec<f32> {
        let mut x = Vec::with_capacity(self.n * self.v);
        for r in 0..self.n {
            for j in 0..self.v {
                let dot: f64 = (0..self.d)
                    .map(|k| f64::from(self.h[r * self.d + k]) * f64::from(self.w[j * self.d + k]))
                    .sum();
                x.push((dot + if bias { f64::from(self.b[j]) } else { 0.0 }) as f32);
            }
        }
        x
    }
    /// The same head with h and W rounded to a half format (and kept as f32, exactly the
    /// values the paths widen).
    pub fn rounded(&self, f: HalfFormat) -> Head {
        let r = |x: &[f32]| x.iter().map(|&x| f.to_f32(f.from_f32(x))).collect();
        Head { h: r(&self.h), w: r(&self.w), b: self.b.clone(), t: self.t.clone(), ..*self }
    }
}
