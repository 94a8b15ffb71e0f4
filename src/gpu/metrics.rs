//! The evaluation metrics on the device: the per-row records the kernels write
//! (`metrics_record` in shaders/row_metrics.wgsl: two vec4 per row), read back into
//! [`RowMetrics`] when per-row outputs are asked, and their sums reduced by
//! shaders/reduce_metrics.wgsl (per chunk, then over the chunks) into one entry that the
//! host reads as [`MetricSums`].

use crate::error::{Error, Result};
use crate::metrics::{MetricSums, MetricsSpec, RowMetrics};

use super::kernels::MetricsReduceParams;
use super::kernels::{
    METRICS_BIN_GROUP as BIN_GROUP, METRICS_HEAD as HEAD, METRICS_IN as IN, METRICS_IN_ROWS as IN_ROWS,
    METRICS_MAX_K as MAX_K,
};

/// Bytes of one row's record.
pub(crate) const RECORD_BYTES: u64 = 32;

/// Decodes consecutive records (8 u32 words each) into `out`.
pub(crate) fn decode(records: &[u32], out: &mut [RowMetrics]) {
    for (m, rec) in out.iter_mut().zip(records.chunks_exact(8)) {
        *m = RowMetrics {
            target: i64::from(rec[5] as i32),
            pred: i64::from(rec[0] as i32),
            above: u64::from(rec[1]),
            confidence: f32::from_bits(rec[2]),
            entropy: f32::from_bits(rec[3]),
            nll: f32::from_bits(rec[4]),
        };
    }
}

/// u32 words of one entry of reduce_metrics.wgsl under `spec`.
pub(crate) fn entry_words(spec: &MetricsSpec) -> usize {
    HEAD + 4 * spec.get_ece_bins()
}

/// Whether the device reduces `spec`'s metrics (at most [`MAX_K`] top-k values).
pub(crate) fn check_spec(spec: &MetricsSpec, path: String) -> Result<()> {
    if spec.get_top_k().len() > MAX_K {
        return Err(Error::Unsupported {
            path,
            cell: format!("{} top-k accuracies", spec.get_top_k().len()),
            why: format!("the device reduces at most {MAX_K}; ask for fewer, or use the CPU paths"),
        });
    }
    Ok(())
}

/// The levels of `reduce_metrics.wgsl` over `count` inputs (row records from `src`, or
/// entries from entry `src`), each with its workgroup count; the levels' outputs go from
/// entry `scratch` on, the last one to `last_to` when given; in workgroups of `wg`, at
/// most `max_dim` a dimension.
pub(crate) struct MetricLevels {
    pub levels: Vec<(MetricsReduceParams, u64)>,
    /// The entry holding the total.
    pub result: u32,
    /// Entries the levels touch (one past the highest).
    pub extent: u32,
}

pub(crate) fn metric_levels(
    spec: &MetricsSpec,
    count: usize,
    from_rows: bool,
    src: u32,
    scratch: u32,
    last_to: Option<u32>,
    (wg, max_dim): (u32, u32),
) -> MetricLevels {
    let ks = spec.get_top_k();
    let k = |i: usize| ks.get(i).map_or(0, |&k| k.min(u32::MAX as usize) as u32);
    let base = MetricsReduceParams {
        bins: spec.get_ece_bins() as u32,
        k_count: ks.len().min(MAX_K) as u32,
        k0: k(0),
        k1: k(1),
        k2: k(2),
        k3: k(3),
        k4: k(4),
        k5: k(5),
        k6: k(6),
        k7: k(7),
        ..bytemuck::Zeroable::zeroed()
    };
    let groups = spec.get_ece_bins().div_ceil(BIN_GROUP) as u64;
    let (mut count, mut from_rows, mut src, mut next) = (count.max(1), from_rows, src, scratch);
    let mut out = MetricLevels { levels: Vec::new(), result: src, extent: scratch.max(src + 1) };
    if !from_rows && count == 1 && last_to.is_none() {
        return out;
    }
    loop {
        let n_out = count.div_ceil(if from_rows { IN_ROWS } else { IN });
        let dst = match last_to {
            Some(d) if n_out == 1 => d,
            _ => next,
        };
        let wgs = (n_out as u64 * groups).div_ceil(u64::from(wg));
        out.levels.push((
            MetricsReduceParams {
                count: count as u32,
                from_rows: u32::from(from_rows),
                src,
                dst,
                groups_x: super::buffers::groups_x(wgs, max_dim),
                ..base
            },
            wgs,
        ));
        out.extent = out.extent.max(dst + n_out as u32);
        if n_out == 1 {
            out.result = dst;
            return out;
        }
        next = dst + n_out as u32;
        (count, from_rows, src) = (n_out, false, dst);
    }
}

impl MetricLevels {
    /// Records the levels over the records and entries `bg` binds.
    pub fn record(
        &self,
        rec: &mut super::buffers::Recorder<'_>,
        kernels: &super::kernels::Kernels,
        bg: &wgpu::BindGroup,
    ) {
        for (params, wgs) in &self.levels {
            rec.dispatch(&kernels.reduce_metrics, bg, params, *wgs);
        }
    }
}

/// The sums of an entry read back.
pub(crate) fn sums_of_entry(spec: &MetricsSpec, words: &[u32]) -> MetricSums {
    let f = |i: usize| f64::from(f32::from_bits(words[i]));
    let mut sums = MetricSums::new(spec);
    sums.counted = u64::from(words[0]);
    sums.correct = u64::from(words[1]);
    for (q, (_, n)) in sums.top_k.iter_mut().enumerate() {
        *n = u64::from(words[2 + q]);
    }
    sums.nll = f(10) - f(11);
    sums.entropy = f(12) - f(13);
    for (b, bin) in sums.bins.iter_mut().enumerate() {
        let w = HEAD + 4 * b;
        bin.count = u64::from(words[w]);
        bin.correct = u64::from(words[w + 1]);
        bin.confidence = f(w + 2) - f(w + 3);
    }
    sums
}

impl super::context::GpuContext {
    /// Reduces the `chunks` per-chunk entries at the start of `entries` (bound with the
    /// records as `bg`) on the device and reads the total back through `readback`.
    pub(crate) fn read_metric_sums(
        &self,
        spec: &MetricsSpec,
        (entries, bg): (&wgpu::Buffer, &wgpu::BindGroup),
        chunks: usize,
        params: &wgpu::Buffer,
        readback: &wgpu::Buffer,
    ) -> Result<MetricSums> {
        let wg = self.kernels.workgroup_size;
        let max_dim = self.limits.max_compute_workgroups_per_dimension;
        let levels = metric_levels(spec, chunks, false, 0, chunks as u32, None, (wg, max_dim));
        let bytes = (entry_words(spec) * 4) as u64;
        let mut rec = super::buffers::Recorder::new(&self.device, &self.limits);
        levels.record(&mut rec, &self.kernels, bg);
        rec.copy(entries, u64::from(levels.result) * bytes, readback, 0, bytes);
        let submission = rec.submit(&self.queue, params);
        let map = self.request_map(readback, bytes);
        let mut words = Vec::new();
        self.finish_map(readback, map, Some(submission), |b| {
            words = bytemuck::cast_slice::<u8, u32>(&b[..bytes as usize]).to_vec()
        })?;
        Ok(sums_of_entry(spec, &words))
    }
}

/// Entries of the buffer that per-chunk reductions of up to `rows` rows and the total
/// over `chunks` chunks use: the chunks' entries first, then the levels' scratch.
pub(crate) fn entries_needed(spec: &MetricsSpec, rows: usize, chunks: usize, wg: u32, max_dim: u32) -> u64 {
    let c = chunks as u32;
    let per_chunk = metric_levels(spec, rows, true, 0, c, Some(0), (wg, max_dim)).extent;
    let total = metric_levels(spec, chunks, false, 0, c, None, (wg, max_dim)).extent;
    u64::from(per_chunk.max(total).max(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_reduce_to_one_entry_where_asked() {
        let spec = MetricsSpec::new().ece_bins(40);
        // 500000 rows: 489 entries (1024 rows each), 8 (64 entries each), then the
        // chunk's entry 3; three bin groups each.
        let l = metric_levels(&spec, 500_000, true, 0, 10, Some(3), (64, 65535));
        let counts: Vec<_> = l.levels.iter().map(|(p, _)| (p.count, p.from_rows, p.dst)).collect();
        assert_eq!(counts, vec![(500_000, 1, 10), (489, 0, 499), (8, 0, 3)]);
        assert_eq!(l.levels[0].1, (489u64 * 3).div_ceil(64));
        assert_eq!((l.result, l.extent), (3, 507));
        // One chunk's entry is already the total.
        let one = metric_levels(&spec, 1, false, 0, 1, None, (64, 65535));
        assert!(one.levels.is_empty() && one.result == 0);
        assert_eq!(entries_needed(&spec, 500_000, 10, 64, 65535), 507);
    }
}
