//! Deterministic synthetic batches (no files, no external RNG crate): the same seed gives
//! the same logits and targets on every machine. Used by `xent check`, the tests and the
//! benchmarks.

/// SplitMix64: tiny, fast, and good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Logits ~ N(0, `scale`²), row major [rows, classes].
pub fn logits(rows: usize, classes: usize, scale: f64, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..rows * classes).map(|_| (rng.normal() * scale) as f32).collect()
}

/// Uniform class-index targets in [0, classes).
pub fn targets(rows: usize, classes: usize, seed: u64) -> Vec<i64> {
    let mut rng = Rng::new(seed ^ 0x5151);
    (0..rows).map(|_| rng.below(classes as u64) as i64).collect()
}
