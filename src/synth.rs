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

/// Logits ~ N(0, `scale`²), row major [rows, classes]. Generated in parallel, in blocks
/// of fixed size with their own seeds, so the values do not depend on the thread count
/// (a billion logits, as `xent bench` times on large GPUs, in seconds rather than a
/// minute).
pub fn logits(rows: usize, classes: usize, scale: f64, seed: u64) -> Vec<f32> {
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 16;
    let mut out = vec![0.0f32; rows * classes];
    out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, block)| {
        let mut rng = Rng::new(seed ^ (b as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        // Box–Muller gives two independent normals per pair of uniforms.
        for pair in block.chunks_mut(2) {
            let (r, theta) =
                ((-2.0 * (1.0 - rng.uniform()).ln()).sqrt(), std::f64::consts::TAU * rng.uniform());
            pair[0] = (r * theta.cos() * scale) as f32;
            if let Some(x) = pair.get_mut(1) {
                *x = (r * theta.sin() * scale) as f32;
            }
        }
    });
    out
}

/// Uniform class-index targets in [0, classes).
pub fn targets(rows: usize, classes: usize, seed: u64) -> Vec<i64> {
    let mut rng = Rng::new(seed ^ 0x5151);
    (0..rows).map(|_| rng.below(classes as u64) as i64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logits_are_normal_and_independent_of_the_thread_count() {
        let (n, v, scale) = (3, 70_001, 2.0);
        let many = logits(n, v, scale, 7);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| logits(n, v, scale, 7));
        assert_eq!(many, one);
        assert_ne!(many, logits(n, v, scale, 8));
        let len = many.len() as f64;
        let mean = many.iter().map(|&x| f64::from(x)).sum::<f64>() / len;
        let var = many.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / len;
        // 210 003 samples: the mean within 5 standard errors, the spread within 1 %.
        assert!(mean.abs() < 5.0 * scale / len.sqrt(), "mean {mean}");
        assert!((var.sqrt() / scale - 1.0).abs() < 0.01, "std {}", var.sqrt());
    }
}
