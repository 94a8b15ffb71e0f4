//! How a linear-head call is cut into row chunks and pieces of W: a pure function of the
//! shape, the device limits and the memory budget.

use std::ops::Range;

use crate::error::{Error, Result};

use super::plan::ROW_OVERHEAD_BYTES;
use super::tuning::SPLIT_BLOCK_COLS;

/// Readback slots of a call (chunks whose results are on their way back at once).
pub(crate) const SLOTS: usize = 2;

/// How a linear-head call is cut: row chunks, and W in pieces of whole classes that
/// each fit one storage binding. A pure function of the shape, the limits and the budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearPlan {
    /// Rows per chunk (the last may have fewer).
    pub rows_per_chunk: usize,
    /// Classes per piece of W (and of dW); the last piece may have fewer.
    pub piece_classes: usize,
    /// Pieces of W.
    pub pieces: usize,
}

impl LinearPlan {
    /// Plans `rows` × `classes` logits of a hidden dimension `dim`: a chunk's logits, h,
    /// dh, readbacks and row buffers within `budget`, its logits and h within one
    /// binding, its row kernels' dispatches within the dispatch limits.
    pub fn new(rows: usize, classes: usize, dim: usize, limits: &wgpu::Limits, budget: u64) -> Result<Self> {
        let (n, v, d) = (rows as u64, classes as u64, dim as u64);
        let binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        let max_groups = u64::from(limits.max_compute_workgroups_per_dimension).pow(2);
        if v * 4 > binding {
            return Err(Error::Unsupported {
                path: "gpu".into(),
                cell: "linear head with rows longer than one storage binding".into(),
                why: format!("a row of {classes} logits does not fit a binding of {binding} bytes"),
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
        let per_row = 4 * v + 8 * d + SLOTS as u64 * 4 * (d + 2) + ROW_OVERHEAD_BYTES;
        let fit = [
            binding / (4 * v),
            binding / (4 * d),
            budget / per_row,
            // The backward kernel's (row × 4096-column block) grid; the row kernel takes
            // fewer workgroups.
            max_groups / v.div_ceil(SPLIT_BLOCK_COLS as u64),
            u64::from(u32::MAX) / v.max(d),
            n.max(1),
        ]
        .into_iter()
        .min()
        .unwrap_or(0);
        if fit == 0 {
            return Err(Error::InvalidOption(format!(
                "memory budget of {budget} bytes cannot hold one row of {classes} logits of the linear head"
            )));
        }
        // Pieces of W: whole classes within a binding, starting at aligned offsets.
        let align = u64::from(limits.min_storage_buffer_offset_alignment).max(4);
        let unit = align / gcd(4 * d, align);
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
        Ok(Self {
            rows_per_chunk: fit as usize,
            piece_classes: piece as usize,
            pieces: classes.div_ceil(piece as usize),
        })
    }

    /// Classes of piece `p`.
    pub fn piece(&self, p: usize, classes: usize) -> Range<usize> {
        p * self.piece_classes..((p + 1) * self.piece_classes).min(classes)
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}
