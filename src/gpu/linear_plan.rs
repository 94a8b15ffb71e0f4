//! How a linear-head call is cut into row chunks and pieces of W, and which way its
//! chunks go: a pure function of the shape, the work asked, the device limits and the
//! memory budget.

use std::ops::Range;

use crate::error::{Error, Result};

use super::plan::ROW_OVERHEAD_BYTES;
use super::tuning::{GEMM_MAX_K, MAX_LANE_STEPS};

/// Readback slots of a call (chunks whose results are on their way back at once).
pub(crate) const SLOTS: usize = 2;

/// Bytes of one row's entry per GEMM tile in the partials (two vec4).
pub(crate) const PART_BYTES: u64 = 48;

/// What a call asks of the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadWork {
    /// The loss (row losses, LSE) only.
    Loss {
        /// With the evaluation metrics (a record per row, and the row's target logit).
        metrics: bool,
    },
    /// The loss and gradients in one call; `recompute` prefers
    /// [`HeadPath::Recompute`] where [`HeadPath::WholeRows`] would fit.
    Fused {
        /// Take the recompute path even where whole rows fit.
        recompute: bool,
        /// With the evaluation metrics.
        metrics: bool,
    },
    /// Gradients from a saved LSE.
    Backward,
}

impl HeadWork {
    /// Whether the metrics are asked for.
    fn metrics(self) -> bool {
        matches!(self, HeadWork::Loss { metrics: true } | HeadWork::Fused { metrics: true, .. })
    }
}

/// Device bytes per row of the metrics: the record, the target logit and the records'
/// readbacks.
const METRIC_ROW_BYTES: u64 = 32 + 4 + SLOTS as u64 * 32;

/// How a chunk's logits are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadPath {
    /// Loss only: the GEMM's epilogue reduces each tile of logits to per-row parts
    /// (`gemm_epilogue.wgsl`, `partials`), merged per row (`merge_partials.wgsl`). No
    /// logits buffer.
    Partials,
    /// Loss and gradients with whole rows of logits in a chunk buffer: the fused row
    /// kernel writes G over them, then dh = G W, dW += Gᵀ h (the logits product once:
    /// three products; Liger's way).
    WholeRows,
    /// Gradients from row statistics (a saved LSE, or the partials forward first): per
    /// piece of W the GEMM's epilogue forms G from the recomputed logits
    /// (`gemm_epilogue.wgsl`, `grad`) into a buffer of that piece's columns, then the
    /// products. Rows of any length; the logits product twice with a forward (four
    /// products), once from a saved LSE.
    Recompute,
}

/// How a linear-head call is cut: row chunks, W in pieces of whole classes that each fit
/// one storage binding, and the path. A pure function of the shape, the work, the limits
/// and the budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearPlan {
    /// Rows per chunk (the last may have fewer).
    pub rows_per_chunk: usize,
    /// Classes per piece of W (and of dW, and of G on the recompute path); the last
    /// piece may have fewer.
    pub piece_classes: usize,
    /// Pieces of W.
    pub pieces: usize,
    /// GEMM tiles (of `tile_cols` columns) per row over all pieces: the partials' entries.
    pub blocks: usize,
    /// The chunks' path.
    pub path: HeadPath,
}

impl LinearPlan {
    /// Plans `rows` × `classes` logits of a hidden dimension `dim` for `work`, with GEMM
    /// tiles `tile_cols` wide: a chunk's buffers (h, dh, logits or G, partials, readbacks,
    /// row buffers) within `budget` and each within one binding.
    pub fn new(
        rows: usize,
        classes: usize,
        dim: usize,
        tile_cols: usize,
        work: HeadWork,
        limits: &wgpu::Limits,
        budget: u64,
    ) -> Result<Self> {
        let (n, v, d) = (rows as u64, classes as u64, dim as u64);
        let binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        if d > u64::from(GEMM_MAX_K) {
            return Err(Error::Unsupported {
                path: "gpu".into(),
                cell: format!("linear head with a hidden dimension of {dim}"),
                why: format!("the GEMM's epilogues take K = D of at most {GEMM_MAX_K} in one dispatch"),
            });
        }
        if v * d * 4 > limits.max_buffer_size {
            return Err(Error::TooLarge {
                what: format!("the weight ({classes} × {dim} f32)"),
                needed: v * d * 4,
                limit: limits.max_buffer_size,
                hint: "the device holds W and dW whole; use the CPU path at this size".into(),
            });
        }
        // Pieces of W: whole classes within a binding, starting at aligned offsets in W
        // (4·D bytes a class) and in b, dW's and db's pieces (4 bytes a class).
        let align = u64::from(limits.min_storage_buffer_offset_alignment).max(4);
        let (unit_w, unit_b) = (align / gcd(4 * d, align), align / 4);
        let unit = unit_w / gcd(unit_w, unit_b) * unit_b;
        let most = binding / (4 * d);
        let piece = if most >= v { v } else { most / unit * unit };
        if piece == 0 {
            return Err(Error::TooLarge {
                what: format!("one class of the weight ({dim} f32) at offsets aligned to {align} bytes"),
                needed: unit * 4 * d,
                limit: binding,
                hint: "the hidden dimension is too large for this device's bindings".into(),
            });
        }
        let pieces = v.div_ceil(piece).max(1);
        let bn = tile_cols.max(1) as u64;
        let last = v - (pieces - 1) * piece;
        let blocks = (pieces - 1) * piece.div_ceil(bn) + last.div_ceil(bn);
        let whole = matches!(work, HeadWork::Fused { recompute: false, .. });
        if blocks > MAX_LANE_STEPS && !whole {
            return Err(Error::Unsupported {
                path: "gpu".into(),
                cell: format!("linear head of {classes} classes without whole rows of logits"),
                why: format!(
                    "merge_partials walks {blocks} tiles a row, beyond the {MAX_LANE_STEPS} loop iterations CPU \
                     adapters allow"
                ),
            });
        }
        // Per row of a chunk, whatever the path: h, dh, the readbacks (dh, loss, LSE)
        // and the row buffers; the metrics'.
        let common = 8 * d
            + SLOTS as u64 * 4 * (d + 2)
            + ROW_OVERHEAD_BYTES
            + if work.metrics() { METRIC_ROW_BYTES } else { 0 };
        let whole_rows_fit = |path_bytes: u64| 4 * v <= binding && common + path_bytes <= budget;
        let path = match work {
            HeadWork::Loss { .. } => HeadPath::Partials,
            HeadWork::Backward => HeadPath::Recompute,
            HeadWork::Fused { recompute: false, .. } if whole_rows_fit(4 * v) => HeadPath::WholeRows,
            HeadWork::Fused { .. } => HeadPath::Recompute,
        };
        let partials = blocks * PART_BYTES;
        let (per_row, widest) = match (path, work) {
            (HeadPath::Partials, _) => (common + partials, partials),
            (HeadPath::WholeRows, _) => (common + 4 * v, 4 * v),
            (HeadPath::Recompute, HeadWork::Backward) => (common + 4 * piece, 4 * piece),
            (HeadPath::Recompute, _) => (common + partials + 4 * piece, partials.max(4 * piece)),
        };
        let fit = [
            binding / widest,
            binding / (4 * d),
            // A row's metric record (two vec4), the widest per-row buffer.
            binding / 32,
            budget / per_row,
            u64::from(u32::MAX) / (v.max(d) + 8 * blocks),
            n.max(1),
        ]
        .into_iter()
        .min()
        .unwrap_or(0);
        if fit == 0 {
            return Err(Error::InvalidOption(format!(
                "memory budget of {budget} bytes cannot hold one row of {classes} classes of the linear head \
                 ({per_row} bytes on the device)"
            )));
        }
        Ok(Self {
            rows_per_chunk: fit as usize,
            piece_classes: piece as usize,
            pieces: pieces as usize,
            blocks: blocks as usize,
            path,
        })
    }

    /// Classes of piece `p`.
    pub fn piece(&self, p: usize, classes: usize) -> Range<usize> {
        p * self.piece_classes..((p + 1) * self.piece_classes).min(classes)
    }

    /// The partials' first block of piece `p` (tiles `tile_cols` wide).
    pub fn first_block(&self, p: usize, tile_cols: usize) -> usize {
        p * self.piece_classes.div_ceil(tile_cols.max(1))
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(binding: u64) -> wgpu::Limits {
        wgpu::Limits {
            max_storage_buffer_binding_size: binding,
            max_buffer_size: 1 << 31,
            min_storage_buffer_offset_alignment: 256,
            ..wgpu::Limits::default()
        }
    }

    #[test]
    fn paths_follow_the_work_and_the_binding() {
        let l = limits(64 << 10);
        let plan = |v, work| LinearPlan::new(100, v, 8, 32, work, &l, 1 << 30).unwrap();
        assert_eq!(plan(1000, HeadWork::Loss { metrics: false }).path, HeadPath::Partials);
        assert_eq!(plan(1000, HeadWork::Backward).path, HeadPath::Recompute);
        assert_eq!(
            plan(1000, HeadWork::Fused { recompute: false, metrics: false }).path,
            HeadPath::WholeRows
        );
        assert_eq!(plan(1000, HeadWork::Fused { recompute: true, metrics: false }).path, HeadPath::Recompute);
        // 20000 logits (80 KB) do not fit a 64 KiB binding: recomputed in pieces.
        let long = plan(20000, HeadWork::Fused { recompute: false, metrics: false });
        assert_eq!(long.path, HeadPath::Recompute);
        assert!(long.pieces >= 3 && long.piece_classes * 8 * 4 <= 64 << 10, "{long:?}");
        assert_eq!(long.blocks, (0..long.pieces).map(|p| long.piece(p, 20000).len().div_ceil(32)).sum());
        assert_eq!(long.first_block(1, 32), long.piece_classes.div_ceil(32));
        // The chunk's G fits a binding and the partials too.
        assert!(long.rows_per_chunk * long.piece_classes * 4 <= 64 << 10);
        assert!(long.rows_per_chunk * long.blocks * PART_BYTES as usize <= 64 << 10);
    }

    #[test]
    fn the_loss_alone_needs_no_logits_buffer() {
        // 4096 × 32000 under 8 MiB: whole rows take 128 KB each, parts 1000 × 48 bytes
        // (with the row buffers and readbacks both share), so about 2.7 times the rows.
        let l = limits(128 << 20);
        let whole = LinearPlan::new(
            4096,
            32000,
            16,
            32,
            HeadWork::Fused { recompute: false, metrics: false },
            &l,
            8 << 20,
        )
        .unwrap();
        let loss =
            LinearPlan::new(4096, 32000, 16, 32, HeadWork::Loss { metrics: false }, &l, 8 << 20).unwrap();
        assert!(2 * loss.rows_per_chunk >= 5 * whole.rows_per_chunk, "{loss:?} vs {whole:?}");
    }

    #[test]
    fn a_budget_below_one_row_is_an_error() {
        let l = limits(128 << 20);
        let err = LinearPlan::new(
            10,
            32000,
            16,
            32,
            HeadWork::Fused { recompute: false, metrics: false },
            &l,
            1000,
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot hold one row"), "{err}");
    }
}
