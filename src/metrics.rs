//! Evaluation metrics from the row state the loss already holds
//! (`shared/docs/semantics.md`, "Evaluation metrics"): what to compute
//! ([`MetricsSpec`], set with [`LossOptions::metrics`](crate::LossOptions::metrics)), what
//! each row gives ([`RowMetrics`]), their sums over rows ([`MetricSums`], a monoid with
//! one [`combine`](MetricSums::combine) that serves row blocks, chunks and shards), and
//! the reduced figures ([`Metrics`], in [`LossOutput::metrics`](crate::LossOutput)).
//!
//! Every path computes a row's metrics in the passes it already makes over the row: the
//! predicted class is the row's maximum, the confidence `1 / Σ exp(z − max)` comes from
//! the softmax sum, the entropy from one more sum `Σ exp(z − max) (z − max)` beside it,
//! and the top-k test from a count `#{c : z_c > z_target}` (the target's logit is read
//! before the row).
//!
//! ```
//! use xent::{BackendExt, LossOptions, MetricsSpec, Reference};
//! let logits = [2.0f32, 0.5, -1.0, /* row 2 */ 0.0, 3.0, 1.0];
//! let opts = LossOptions::new().metrics(MetricsSpec::new().top_k(&[1, 2]));
//! let m = Reference.cross_entropy(&logits, 3, &[0i64, 2], &opts)?.metrics.unwrap();
//! assert_eq!(m.accuracy, 0.5); // row 2 predicts class 1
//! assert_eq!(m.top_k_accuracy, vec![(1, 0.5), (2, 1.0)]);
//! assert_eq!(m.counted_rows, 2);
//! # Ok::<(), xent::Error>(())
//! ```

use crate::error::{Error, Result};

/// The default number of calibration bins.
pub const DEFAULT_ECE_BINS: usize = 15;
/// The most calibration bins a call may ask for.
pub const MAX_ECE_BINS: usize = 1000;

/// Which metrics to compute beside the loss.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsSpec {
    top_k: Vec<usize>,
    ece_bins: usize,
    per_row: bool,
}

impl Default for MetricsSpec {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsSpec {
    /// Accuracy, top-1 and top-5 accuracy, nll, perplexity, entropy and the ECE over
    /// [`DEFAULT_ECE_BINS`] bins; no per-row output.
    pub fn new() -> Self {
        Self { top_k: vec![1, 5], ece_bins: DEFAULT_ECE_BINS, per_row: false }
    }
    /// The k of the top-k accuracies (sorted, duplicates dropped; each k ≥ 1).
    pub fn top_k(mut self, ks: &[usize]) -> Self {
        let mut ks = ks.to_vec();
        ks.sort_unstable();
        ks.dedup();
        self.top_k = ks;
        self
    }
    /// The number of equal-width confidence bins of the ECE (1 ..= [`MAX_ECE_BINS`]).
    pub fn ece_bins(mut self, bins: usize) -> Self {
        self.ece_bins = bins;
        self
    }
    /// Also return each row's predicted class and confidence
    /// ([`Metrics::predictions`], [`Metrics::confidences`]).
    pub fn per_row(mut self, yes: bool) -> Self {
        self.per_row = yes;
        self
    }
    /// The k of the top-k accuracies, ascending.
    pub fn get_top_k(&self) -> &[usize] {
        &self.top_k
    }
    /// The number of calibration bins.
    pub fn get_ece_bins(&self) -> usize {
        self.ece_bins
    }
    /// Whether per-row predictions and confidences are returned.
    pub fn get_per_row(&self) -> bool {
        self.per_row
    }
    /// Checks the spec: every k ≥ 1, 1 ≤ bins ≤ [`MAX_ECE_BINS`].
    pub fn validate(&self) -> Result<()> {
        if self.top_k.contains(&0) {
            return Err(Error::InvalidOption("top-k: every k must be >= 1, got 0".into()));
        }
        if !(1..=MAX_ECE_BINS).contains(&self.ece_bins) {
            return Err(Error::InvalidOption(format!(
                "ECE bins must be in [1, {MAX_ECE_BINS}], got {}",
                self.ece_bins
            )));
        }
        Ok(())
    }
}

/// One row's metrics, on the transformed logits `z` (logit scale and softcap applied).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowMetrics {
    /// The class the row is scored against: its class-index target, or the argmax of its
    /// probability row; −1 for an ignored row, which is not counted.
    pub target: i64,
    /// The argmax of `z`, the lowest index among equal maxima; −1 for a row holding a NaN.
    pub pred: i64,
    /// `#{c : z_c > z_target}` (0 for an ignored row).
    pub above: u64,
    /// The largest softmax probability, `1 / Σ_c exp(z_c − max z)`.
    pub confidence: f32,
    /// `lse − Σ_c p_c z_c`.
    pub entropy: f32,
    /// `lse − z_target` (0 for an ignored row).
    pub nll: f32,
}

impl RowMetrics {
    /// A row not filled in yet (not counted, NaN figures): the placeholder of buffers the
    /// paths write each row's metrics into.
    pub(crate) const UNSET: RowMetrics =
        RowMetrics { target: -1, pred: -1, above: 0, confidence: f32::NAN, entropy: f32::NAN, nll: f32::NAN };

    /// Whether the row is counted (its target is not ignored).
    pub fn counted(&self) -> bool {
        self.target >= 0
    }
    /// Whether the prediction is right (never for a NaN row).
    pub fn correct(&self) -> bool {
        self.pred >= 0 && self.pred == self.target
    }
    /// Whether the target is among the `k` largest logits, ties counting for the target
    /// (never for a NaN row).
    pub fn in_top(&self, k: usize) -> bool {
        self.pred >= 0 && self.above < k as u64
    }

    /// A row's metrics from its f32 statistics: `max` and `sum = Σ exp(z − max)` of the
    /// online softmax, `spread = Σ exp(z − max) (z − max)`, the argmax (`None` when the row
    /// holds a NaN), the count above the target and the target's logit.
    pub fn from_stats(
        target: i64,
        argmax: Option<usize>,
        above: u64,
        max: f32,
        sum: f32,
        spread: f32,
        z_target: f32,
    ) -> Self {
        let log_s = sum.ln();
        let counted = target >= 0;
        // A row of only −inf has no softmax (sum 0): NaN, as exp(z − max z) is there.
        let live = sum > 0.0;
        RowMetrics {
            target,
            pred: argmax.map_or(-1, |a| a as i64),
            above: if counted { above } else { 0 },
            confidence: if live { 1.0 / sum } else { f32::NAN },
            entropy: if live { log_s - spread / sum } else { f32::NAN },
            nll: if counted { (max - z_target) + log_s } else { 0.0 },
        }
    }

    /// A row's metrics from its transformed logits in f64 (the reference), against class
    /// `target` (`None`: ignored).
    pub fn of_row(z: &[f64], target: Option<usize>) -> Self {
        let nan = z.iter().any(|x| x.is_nan());
        let mut arg = 0;
        for (c, &x) in z.iter().enumerate() {
            if x > z[arg] {
                arg = c;
            }
        }
        let m = z.get(arg).copied().unwrap_or(f64::NEG_INFINITY);
        let (mut s, mut spread) = (0.0f64, 0.0f64);
        for &x in z {
            let e = (x - m).exp();
            s += e;
            if e != 0.0 {
                spread += e * (x - m);
            }
        }
        let lse = m + s.ln();
        let (above, nll) = match target {
            Some(t) => (z.iter().filter(|&&x| x > z[t]).count() as u64, lse - z[t]),
            None => (0, 0.0),
        };
        RowMetrics {
            target: target.map_or(-1, |t| t as i64),
            pred: if nan { -1 } else { arg as i64 },
            above,
            confidence: (1.0 / s) as f32,
            entropy: (s.ln() - spread / s) as f32,
            nll: nll as f32,
        }
    }
}

/// The argmax of a probability row (the class a probability target scores against):
/// the lowest index among equal maxima.
pub fn target_class(probs: &[f32]) -> usize {
    let mut arg = 0;
    for (c, &p) in probs.iter().enumerate() {
        if p > probs[arg] {
            arg = c;
        }
    }
    arg
}

/// One calibration bin: the counted rows whose confidence falls in it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CalibrationBin {
    /// Rows in the bin.
    pub count: u64,
    /// Sum of their confidences.
    pub confidence: f64,
    /// How many of them are correct.
    pub correct: u64,
}

/// Sums of row metrics over counted rows: one [`push`](Self::push) per row, one
/// [`combine`](Self::combine) for two disjoint sets of rows (exact for the counts; the
/// float sums are f64, added in the order of the combines).
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSums {
    /// Counted rows.
    pub counted: u64,
    /// Correct predictions.
    pub correct: u64,
    /// For each asked k, the rows whose target is in the top k.
    pub top_k: Vec<(usize, u64)>,
    /// Σ nll.
    pub nll: f64,
    /// Σ entropy.
    pub entropy: f64,
    /// The calibration histogram.
    pub bins: Vec<CalibrationBin>,
}

impl MetricSums {
    /// The empty sums for `spec`.
    pub fn new(spec: &MetricsSpec) -> Self {
        MetricSums {
            counted: 0,
            correct: 0,
            top_k: spec.top_k.iter().map(|&k| (k, 0)).collect(),
            nll: 0.0,
            entropy: 0.0,
            bins: vec![CalibrationBin::default(); spec.ece_bins],
        }
    }

    /// The bin of a confidence: `min(floor(confidence · B), B − 1)`, the product in f32
    /// as the device computes it (a NaN confidence goes to bin 0, where it makes the ECE
    /// NaN).
    pub fn bin_of(&self, confidence: f32) -> usize {
        let b = self.bins.len();
        ((confidence * b as f32).floor() as usize).min(b - 1)
    }

    /// Adds one row (nothing for a row that is not counted).
    pub fn push(&mut self, row: &RowMetrics) {
        if !row.counted() {
            return;
        }
        let correct = row.correct();
        self.counted += 1;
        self.correct += u64::from(correct);
        for (k, n) in &mut self.top_k {
            *n += u64::from(row.in_top(*k));
        }
        self.nll += f64::from(row.nll);
        self.entropy += f64::from(row.entropy);
        let b = self.bin_of(row.confidence);
        let bin = &mut self.bins[b];
        bin.count += 1;
        bin.confidence += f64::from(row.confidence);
        bin.correct += u64::from(correct);
    }

    /// The sums of both sets of rows (same spec).
    pub fn combine(mut self, other: &MetricSums) -> MetricSums {
        self.add(other);
        self
    }

    /// Adds the sums of another set of rows (same spec).
    pub fn add(&mut self, other: &MetricSums) {
        self.counted += other.counted;
        self.correct += other.correct;
        for ((_, a), (_, b)) in self.top_k.iter_mut().zip(&other.top_k) {
            *a += b;
        }
        self.nll += other.nll;
        self.entropy += other.entropy;
        for (a, b) in self.bins.iter_mut().zip(&other.bins) {
            a.count += b.count;
            a.confidence += b.confidence;
            a.correct += b.correct;
        }
    }

    /// The reduced figures (NaN for each with no counted row); no per-row output.
    pub fn finish(&self) -> Metrics {
        let n = self.counted as f64;
        let mean = |x: f64| if self.counted == 0 { f64::NAN } else { x / n };
        let nll = mean(self.nll);
        let ece = if self.counted == 0 {
            f64::NAN
        } else {
            self.bins
                .iter()
                .filter(|b| b.count > 0)
                .map(|b| {
                    let c = b.count as f64;
                    c / n * (b.correct as f64 / c - b.confidence / c).abs()
                })
                .sum()
        };
        Metrics {
            accuracy: mean(self.correct as f64),
            top_k_accuracy: self.top_k.iter().map(|&(k, c)| (k, mean(c as f64))).collect(),
            nll,
            perplexity: nll.exp(),
            entropy: mean(self.entropy),
            ece,
            counted_rows: self.counted,
            sums: self.clone(),
            predictions: None,
            confidences: None,
        }
    }
}

/// The metrics of an evaluation, reduced over the counted rows (unweighted).
#[derive(Clone, Debug, PartialEq)]
pub struct Metrics {
    /// Mean of `pred == target`.
    pub accuracy: f64,
    /// For each asked k (ascending), the fraction of rows whose target is in the top k.
    pub top_k_accuracy: Vec<(usize, f64)>,
    /// Mean of `lse − z_target` (no weight, smoothing or z-loss).
    pub nll: f64,
    /// `exp(nll)`.
    pub perplexity: f64,
    /// Mean entropy of the softmax.
    pub entropy: f64,
    /// Expected calibration error over the bins.
    pub ece: f64,
    /// Rows counted (not ignored).
    pub counted_rows: u64,
    /// The sums the figures come from, with the calibration histogram (for reliability
    /// diagrams); [`MetricSums::combine`] merges those of disjoint row sets.
    pub sums: MetricSums,
    /// Each row's predicted class (−1 for a NaN row), when asked
    /// ([`MetricsSpec::per_row`]).
    pub predictions: Option<Vec<i64>>,
    /// Each row's confidence, when asked.
    pub confidences: Option<Vec<f32>>,
}

impl Metrics {
    /// The metrics of `rows` (every row of an evaluation, in order) under `spec`.
    pub fn from_rows(spec: &MetricsSpec, rows: &[RowMetrics]) -> Metrics {
        let mut sums = MetricSums::new(spec);
        rows.iter().for_each(|r| sums.push(r));
        Metrics::from_sums(&sums, spec.per_row.then_some(rows))
    }

    /// The figures of `sums`, with each row's prediction and confidence from `rows` when
    /// given (the per-row outputs).
    pub fn from_sums(sums: &MetricSums, rows: Option<&[RowMetrics]>) -> Metrics {
        let mut m = sums.finish();
        if let Some(rows) = rows {
            m.predictions = Some(rows.iter().map(|r| r.pred).collect());
            m.confidences = Some(rows.iter().map(|r| r.confidence).collect());
        }
        m
    }

    /// `all` followed by `part` ([`append`](Self::append)), either possibly absent.
    pub(crate) fn join(all: Option<Metrics>, part: Option<Metrics>) -> Option<Metrics> {
        match (all, part) {
            (Some(all), Some(part)) => Some(all.append(part)),
            (all, part) => all.or(part),
        }
    }

    /// The metrics of this evaluation's rows followed by `next`'s (row blocks of one
    /// batch, or row shards in order): the sums combined, the per-row outputs appended.
    pub fn append(self, next: Metrics) -> Metrics {
        let mut m = self.sums.combine(&next.sums).finish();
        m.predictions = self.predictions.zip(next.predictions).map(|(mut a, b)| {
            a.extend(b);
            a
        });
        m.confidences = self.confidences.zip(next.confidences).map(|(mut a, b)| {
            a.extend(b);
            a
        });
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_contract() {
        // Ties: lowest index predicted; the target tied with the max is in the top 1.
        let r = RowMetrics::of_row(&[1.0, 3.0, 3.0, 0.0], Some(2));
        assert_eq!((r.pred, r.above, r.correct(), r.in_top(1)), (1, 0, false, true));
        let nan = RowMetrics::of_row(&[1.0, f64::NAN, 3.0], Some(2));
        assert_eq!(nan.pred, -1);
        assert!(!nan.correct() && !nan.in_top(3));
        // Uniform row: confidence 1/V, entropy ln V, nll ln V.
        let u = RowMetrics::of_row(&[0.5; 4], Some(3));
        assert!((u.confidence - 0.25).abs() < 1e-7);
        assert!((u.entropy - 4f32.ln()).abs() < 1e-6 && (u.nll - 4f32.ln()).abs() < 1e-6);
        // A masked class adds nothing to the entropy.
        let m = RowMetrics::of_row(&[0.0, f64::NEG_INFINITY, 0.0], Some(0));
        assert!((m.entropy - 2f32.ln()).abs() < 1e-6);
        let f = RowMetrics::from_stats(0, Some(0), 0, 0.0, 2.0, 0.0, 0.0);
        assert!((f.entropy - m.entropy).abs() < 1e-7 && (f.nll - m.nll).abs() < 1e-7);
    }

    #[test]
    fn sums_reduce_and_combine() {
        let spec = MetricsSpec::new().top_k(&[1, 2]).ece_bins(2);
        let rows = [
            RowMetrics::of_row(&[2.0, 0.0, 0.0], Some(0)),
            RowMetrics::of_row(&[0.0, 1.0, 0.0], Some(2)),
            RowMetrics::of_row(&[0.0, 1.0, 0.0], None),
        ];
        let mut all = MetricSums::new(&spec);
        rows.iter().for_each(|r| all.push(r));
        let (mut a, mut b) = (MetricSums::new(&spec), MetricSums::new(&spec));
        a.push(&rows[0]);
        rows[1..].iter().for_each(|r| b.push(r));
        assert_eq!(a.combine(&b), all);
        let m = all.finish();
        assert_eq!((m.counted_rows, m.accuracy), (2, 0.5));
        assert_eq!(m.top_k_accuracy, vec![(1, 0.5), (2, 1.0)]);
        let c0 = f64::from(rows[0].confidence);
        let c1 = f64::from(rows[1].confidence);
        // Row 0 (confidence 0.79) in bin 1, correct; row 1 (0.58) in bin 1, wrong.
        let expected = (0.5 - (c0 + c1) / 2.0).abs();
        assert!((m.ece - expected).abs() < 1e-12, "{} vs {expected}", m.ece);
        let none = MetricSums::new(&spec).finish();
        assert!(none.accuracy.is_nan() && none.ece.is_nan() && none.perplexity.is_nan());
    }
}
