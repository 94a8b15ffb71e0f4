//! The per-row metric records the kernels write (`metrics_record` in
//! shaders/row_metrics.wgsl: two vec4 per row), read back into [`RowMetrics`].

use crate::metrics::RowMetrics;

/// Bytes of one row's record.
pub(crate) const RECORD_BYTES: u64 = 32;

/// A row's metrics before its record is read back.
pub(crate) const NO_RECORD: RowMetrics =
    RowMetrics { target: -1, pred: -1, above: 0, confidence: f32::NAN, entropy: f32::NAN, nll: f32::NAN };

/// Decodes consecutive records (8 floats each) into `out`.
pub(crate) fn decode(records: &[f32], out: &mut [RowMetrics]) {
    for (m, rec) in out.iter_mut().zip(records.chunks_exact(8)) {
        *m = RowMetrics {
            target: i64::from(rec[5].to_bits() as i32),
            pred: i64::from(rec[0].to_bits() as i32),
            above: u64::from(rec[1].to_bits()),
            confidence: rec[2],
            entropy: rec[3],
            nll: rec[4],
        };
    }
}
