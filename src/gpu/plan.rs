//! How a problem is cut into pieces that fit the device: a pure function of the shape,
//! the device limits and the memory budget, tested without a GPU.
//!
//! Rows that fit in one binding go through the fused kernel, `rows_per_chunk` whole rows
//! at a time ([`Layout::Rows`]). A row larger than one binding (or than the budget) is
//! cut into column pieces ([`Layout::Split`]): each piece yields partial (max, sum)
//! states that are merged per row with the [`crate::RowState`] rule, and the gradient,
//! when asked for, is a second sweep over the pieces.

use std::ops::Range;

use crate::error::{Error, Result};

pub use super::tuning::SPLIT_BLOCK_COLS;
use super::tuning::{Tuning, rows_layout};

/// Device bytes a call may use by default for its streamed chunks.
pub const DEFAULT_BUDGET: u64 = 1 << 30;
/// Chunks in flight by default: two, so that one uploads while the other computes.
pub const DEFAULT_RING: usize = 2;
/// Device bytes per row of the per-row buffers of a chunk (targets, loss, LSE, weight,
/// statistics, their readback and reduction scratch).
pub const ROW_OVERHEAD_BYTES: u64 = 48;

/// What the device allows, and how much of it a call may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanLimits {
    /// Largest storage binding in bytes (`max_storage_buffer_binding_size`, capped by
    /// `max_buffer_size`).
    pub max_binding: u64,
    /// `max_compute_workgroups_per_dimension`.
    pub max_workgroups_per_dim: u32,
    /// The kernels' shape on this adapter.
    pub tuning: Tuning,
    /// Device bytes all chunks in flight may use together.
    pub budget: u64,
    /// Chunks in flight at once (at least 1).
    pub ring: usize,
}

impl PlanLimits {
    /// The limits of a device, with the default budget and ring.
    pub fn of(limits: &wgpu::Limits, tuning: Tuning) -> Self {
        Self {
            max_binding: limits.max_storage_buffer_binding_size.min(limits.max_buffer_size),
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            tuning,
            budget: DEFAULT_BUDGET,
            ring: DEFAULT_RING,
        }
    }

    fn max_groups(&self) -> u64 {
        u64::from(self.max_workgroups_per_dim).pow(2)
    }
}

/// Which gradient a call writes; it decides how many buffers of a chunk's size a slot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradKind {
    /// Loss only.
    None,
    /// Gradient to a separate buffer.
    Separate,
    /// Gradient over the logits.
    InPlace,
}

impl GradKind {
    /// Buffers of the chunk's size per slot: the logits, a separate gradient, a readback.
    fn buffers_per_element(self) -> u64 {
        match self {
            GradKind::None => 1,
            GradKind::Separate => 3,
            GradKind::InPlace => 2,
        }
    }
}

/// What a plan streams: the loss's kernel decides how many buffers of a chunk's size a
/// slot holds and how many workgroups a chunk takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Streamed {
    /// Class indices through the fused row kernel (see [`Plan::new`]).
    Classes(GradKind),
    /// Probability targets: the logits and a second N×V input (the targets), and the
    /// gradient with its readback for [`GradKind::Separate`]; one workgroup per row, and
    /// rows are never split.
    Probabilities(GradKind),
    /// Binary targets, elementwise (a workgroup takes 4 × its size of elements, a split
    /// piece of a row is a chunk of its own): `inputs` N×V arrays uploaded (the logits,
    /// the targets, a per-element upstream gradient) and `outputs` read back (the
    /// gradient, the element losses), each with its readback.
    Binary {
        /// N×V arrays uploaded per chunk.
        inputs: u32,
        /// N×V arrays computed and read back per chunk.
        outputs: u32,
    },
}

impl Streamed {
    /// Buffers of the chunk's size per slot.
    pub fn buffers_per_element(self) -> u64 {
        match self {
            Streamed::Classes(grad) => grad.buffers_per_element(),
            Streamed::Probabilities(grad) => 2 + if grad == GradKind::None { 0 } else { 2 },
            Streamed::Binary { inputs, outputs } => u64::from(inputs) + 2 * u64::from(outputs),
        }
    }

    /// The gradient of a class-index or probability-target call (binary targets: `None`,
    /// their outputs say what is read back).
    fn grad(self) -> GradKind {
        match self {
            Streamed::Classes(grad) | Streamed::Probabilities(grad) => grad,
            Streamed::Binary { .. } => GradKind::None,
        }
    }
}

/// The shape of the chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Whole rows, `rows_per_chunk` at a time, `threads_per_row` invocations per row.
    Rows {
        /// Rows in each chunk (the last chunk may have fewer).
        rows_per_chunk: usize,
        /// Invocations per row in the fused kernel (a power of two ≤ the workgroup size).
        threads_per_row: u32,
        /// Whether rows take the fused kernel's one-read, register-cached path.
        cached: bool,
        /// For few long rows (`Tuning::few_rows`, GPUs): column blocks per row of a
        /// (row × block) grid of workgroups (partial states, a merge, and the gradient
        /// kernel) instead of one workgroup per row, so that a handful of rows still
        /// fills the device.
        blocks_per_row: Option<usize>,
    },
    /// Every row cut into `pieces` column pieces of `piece_cols` (the last one ragged).
    Split {
        /// Columns per piece.
        piece_cols: usize,
        /// Pieces per row.
        pieces: usize,
        /// Workgroups per piece: column blocks of [`SPLIT_BLOCK_COLS`] (class indices),
        /// or of 4 × the workgroup size (binary targets).
        blocks_per_piece: usize,
    },
}

/// One unit of streamed work: a block of the [rows, classes] matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Rows of the block.
    pub rows: Range<usize>,
    /// Columns of the block (all of them in the row layout).
    pub cols: Range<usize>,
}

impl Chunk {
    /// The chunk's elements in the row-major [rows, `classes`] array: contiguous, since a
    /// chunk is whole rows or a piece of one row.
    pub fn span(&self, classes: usize) -> Range<usize> {
        self.rows.start * classes + self.cols.start..(self.rows.end - 1) * classes + self.cols.end
    }
}

/// A plan for one call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Rows N.
    pub rows: usize,
    /// Classes V.
    pub classes: usize,
    /// The gradient written (class indices and probability targets).
    pub grad: GradKind,
    /// What each chunk streams.
    pub streamed: Streamed,
    /// The chunk shape.
    pub layout: Layout,
    /// Slots in flight.
    pub ring: usize,
    /// Elements of the largest chunk (the size of each slot's logits buffer).
    pub chunk_elems: usize,
    /// Rows of per-row output per slot.
    pub slot_rows: usize,
}

impl Plan {
    /// Plans an [rows, classes] problem of class indices. Fails only when nothing fits:
    /// the budget cannot hold even a minimal piece, or the per-chunk results outgrow one
    /// binding.
    pub fn new(rows: usize, classes: usize, grad: GradKind, limits: &PlanLimits) -> Result<Self> {
        Self::streaming(rows, classes, Streamed::Classes(grad), limits)
    }

    /// Plans an [rows, classes] problem of any label kind: chunks of whole rows where a
    /// row fits the binding, the budget and the dispatch limits, else rows cut into
    /// column pieces (not for probability targets: one row that does not fit is an
    /// error, [`Error::InvalidOption`] for the budget, [`Error::TooLarge`] for the binding).
    pub fn streaming(rows: usize, classes: usize, streamed: Streamed, limits: &PlanLimits) -> Result<Self> {
        if classes == 0 {
            return Err(Error::InvalidOption("classes must be at least 1".into()));
        }
        let ring = limits.ring.max(1);
        let slot_budget = limits.budget / ring as u64;
        let per_elem = 4 * streamed.buffers_per_element();
        let v = classes as u64;
        let wg = u64::from(limits.tuning.workgroup_size);
        let (threads_per_row, cached) = rows_layout(v, &limits.tuning);
        // Rows one chunk's dispatch can take within max_groups workgroups.
        let dispatch_rows = match streamed {
            Streamed::Classes(_) => limits.max_groups() * (wg / u64::from(threads_per_row)),
            Streamed::Probabilities(_) => limits.max_groups(),
            Streamed::Binary { .. } => limits.max_groups() * 4 * wg / v,
        };
        // The row grid: a workgroup and a partial entry (three vec4) per (row, block).
        let grid = matches!(streamed, Streamed::Classes(_)) && limits.tuning.row_grid(rows, classes);
        let blocks = if grid { v.div_ceil(SPLIT_BLOCK_COLS as u64) } else { 0 };
        let fit_rows = [
            limits.max_binding / (v * 4),
            // The widest per-row buffer: a row's metric record (two vec4), or its partials.
            limits.max_binding / (32u64).max(blocks * 48),
            slot_budget / (v * per_elem + ROW_OVERHEAD_BYTES + blocks * 48),
            if grid { limits.max_groups() / blocks } else { dispatch_rows },
            u64::from(u32::MAX) / v.max(1),
            rows.max(1) as u64,
        ]
        .into_iter()
        .min()
        .unwrap_or(0);
        if fit_rows >= 1 {
            return Ok(Self {
                rows,
                classes,
                grad: streamed.grad(),
                streamed,
                layout: Layout::Rows {
                    rows_per_chunk: fit_rows as usize,
                    threads_per_row,
                    cached,
                    blocks_per_row: grid.then(|| classes.div_ceil(SPLIT_BLOCK_COLS)),
                },
                ring,
                chunk_elems: fit_rows as usize * classes,
                slot_rows: fit_rows as usize,
            });
        }
        if let Streamed::Probabilities(_) = streamed {
            if v * 4 > limits.max_binding {
                return Err(Error::TooLarge {
                    what: format!("a row of {classes} probability targets"),
                    needed: v * 4,
                    limit: limits.max_binding,
                    hint: "the probability kernel does not split rows; use the CPU path at this size".into(),
                });
            }
            return Err(Error::InvalidOption(format!(
                "memory budget of {} bytes over {ring} slots cannot hold one row of {classes} probability targets",
                limits.budget
            )));
        }

        // Split rows: the largest piece the binding and the budget allow, a multiple of
        // 64 columns when it can be (aligned offsets, whole vectors).
        let block = match streamed {
            Streamed::Binary { .. } => 4 * wg as usize,
            _ => SPLIT_BLOCK_COLS,
        };
        let mut piece = (limits.max_binding / 4)
            .min(slot_budget.saturating_sub(ROW_OVERHEAD_BYTES) / per_elem)
            .min(limits.max_groups() * block as u64)
            .min(v);
        if piece >= 128 {
            piece -= piece % 64;
        }
        if piece == 0 {
            return Err(Error::InvalidOption(format!(
                "memory budget of {} bytes over {ring} slots cannot hold a single column piece",
                limits.budget
            )));
        }
        let piece_cols = piece as usize;
        let pieces = classes.div_ceil(piece_cols);
        let blocks_per_piece = piece_cols.div_ceil(block);
        // The merge of a row's partial states binds them all (binary pieces have none).
        // Three vec4 an entry (row_partials.wgsl).
        let partial_bytes = (pieces * blocks_per_piece * 48) as u64;
        if matches!(streamed, Streamed::Classes(_)) && partial_bytes > limits.max_binding {
            return Err(Error::TooLarge {
                what: format!("partial states of a row of {classes} classes"),
                needed: partial_bytes,
                limit: limits.max_binding,
                hint: "raise the memory budget so that pieces are larger".into(),
            });
        }
        Ok(Self {
            rows,
            classes,
            grad: streamed.grad(),
            streamed,
            layout: Layout::Split { piece_cols, pieces, blocks_per_piece },
            ring,
            chunk_elems: piece_cols,
            slot_rows: 1,
        })
    }

    /// The forward chunks, in order: blocks of whole rows, or the pieces of each row.
    pub fn chunks(&self) -> impl Iterator<Item = Chunk> + '_ {
        let (n, v) = (self.rows, self.classes);
        let (row_step, col_step) = match self.layout {
            Layout::Rows { rows_per_chunk, .. } => (rows_per_chunk, v),
            Layout::Split { piece_cols, .. } => (1, piece_cols),
        };
        (0..n).step_by(row_step.max(1)).flat_map(move |r| {
            let rows = r..(r + row_step).min(n);
            (0..v)
                .step_by(col_step)
                .map(move |c| Chunk { rows: rows.clone(), cols: c..(c + col_step).min(v) })
        })
    }

    /// Number of row groups whose losses are reduced per chunk (chunks of whole rows, or
    /// single split rows).
    pub fn row_groups(&self) -> usize {
        match self.layout {
            Layout::Rows { rows_per_chunk, .. } => self.rows.div_ceil(rows_per_chunk),
            Layout::Split { .. } => self.rows,
        }
    }

    /// Loss sums per call, one per chunk of rows, and for split rows one per row (class
    /// indices merge a row's pieces first) or one per piece (binary targets).
    pub fn chunk_sums(&self) -> usize {
        match (self.layout, self.streamed) {
            (Layout::Split { pieces, .. }, Streamed::Binary { .. }) => self.rows * pieces,
            _ => self.row_groups(),
        }
    }

    /// Device bytes of one slot (the buffers one chunk in flight uses).
    pub fn slot_bytes(&self) -> u64 {
        self.chunk_elems as u64 * 4 * self.streamed.buffers_per_element()
            + self.slot_rows as u64 * ROW_OVERHEAD_BYTES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lavapipe() -> PlanLimits {
        PlanLimits {
            max_binding: 128 << 20,
            max_workgroups_per_dim: 65535,
            tuning: Tuning::GPU,
            budget: DEFAULT_BUDGET,
            ring: 2,
        }
    }

    fn tiny(budget_chunks: u64) -> PlanLimits {
        PlanLimits {
            max_binding: 64 << 10,
            max_workgroups_per_dim: 7,
            tuning: Tuning::GPU,
            budget: budget_chunks * (64 << 10),
            ring: 3,
        }
    }

    /// Every element is covered exactly once, chunks respect the binding, the budget and
    /// the dispatch limits.
    fn check_invariants(plan: &Plan, limits: &PlanLimits) {
        let mut covered = vec![0u8; plan.rows * plan.classes];
        let mut count = 0;
        for ch in plan.chunks() {
            count += 1;
            assert!(!ch.rows.is_empty() && !ch.cols.is_empty(), "{ch:?}");
            assert!(ch.rows.len() * ch.cols.len() <= plan.chunk_elems);
            assert!((ch.rows.len() * ch.cols.len() * 4) as u64 <= limits.max_binding);
            for r in ch.rows.clone() {
                for c in ch.cols.clone() {
                    covered[r * plan.classes + c] += 1;
                }
            }
        }
        assert!(covered.iter().all(|&c| c == 1), "every element exactly once");
        assert!(plan.slot_bytes() * plan.ring as u64 <= limits.budget, "{plan:?}");
        match plan.layout {
            Layout::Rows { rows_per_chunk, threads_per_row, .. } => {
                let per_group = (limits.tuning.workgroup_size / threads_per_row) as usize;
                let groups = rows_per_chunk.div_ceil(per_group) as u64;
                assert!(groups <= limits.max_groups());
                assert_eq!(count, plan.rows.div_ceil(rows_per_chunk));
            }
            Layout::Split { piece_cols, pieces, blocks_per_piece } => {
                assert!(pieces >= 2);
                assert!(blocks_per_piece as u64 <= limits.max_groups());
                assert_eq!(count, plan.rows * pieces);
                assert!(piece_cols * 4 <= limits.max_binding as usize);
            }
        }
    }

    #[test]
    fn llm_batch_on_lavapipe_is_whole_rows_within_one_binding() {
        let limits = lavapipe();
        let plan = Plan::new(16385, 131072, GradKind::None, &limits).unwrap();
        assert_eq!(
            plan.layout,
            Layout::Rows { rows_per_chunk: 256, threads_per_row: 256, cached: false, blocks_per_row: None }
        );
        assert_eq!(plan.chunks().count(), 65);
        assert!(plan.slot_bytes() * 2 <= limits.budget);
        let last = plan.chunks().last().unwrap();
        assert_eq!(last.rows, 16384..16385, "ragged tail");
        // With a gradient the chunks shrink to keep the budget.
        let plan = Plan::new(16385, 131072, GradKind::Separate, &limits).unwrap();
        assert!(plan.slot_bytes() * 2 <= limits.budget);
    }

    #[test]
    fn tiny_limits_cover_every_chunking_path() {
        // Many rows per chunk, with a ragged tail.
        let l = tiny(3);
        let p = Plan::new(1000, 10, GradKind::Separate, &l).unwrap();
        assert!(matches!(p.layout, Layout::Rows { rows_per_chunk, .. } if rows_per_chunk > 1));
        assert_ne!(
            1000 % match p.layout {
                Layout::Rows { rows_per_chunk, .. } => rows_per_chunk,
                _ => 0,
            },
            0
        );
        check_invariants(&p, &l);
        // One row per chunk.
        let p = Plan::new(9, 12000, GradKind::None, &l).unwrap();
        assert!(matches!(p.layout, Layout::Rows { rows_per_chunk: 1, .. }), "{p:?}");
        check_invariants(&p, &l);
        // A row split over several chunks (larger than one 64 KiB binding), ragged piece.
        let p = Plan::new(3, 40000, GradKind::InPlace, &l).unwrap();
        assert!(matches!(p.layout, Layout::Split { pieces, .. } if pieces >= 3), "{p:?}");
        assert_ne!(
            40000
                % match p.layout {
                    Layout::Split { piece_cols, .. } => piece_cols,
                    _ => 0,
                },
            0
        );
        check_invariants(&p, &l);
        // The budget, not the binding, forces the split.
        let small_budget = PlanLimits { budget: 3 * 8192, ..l };
        let p = Plan::new(2, 4000, GradKind::Separate, &small_budget).unwrap();
        assert!(matches!(p.layout, Layout::Split { .. }), "{p:?}");
        check_invariants(&p, &small_budget);
        // The dispatch limit caps rows per chunk for tiny rows.
        let p = Plan::new(100000, 1, GradKind::None, &l).unwrap();
        check_invariants(&p, &l);
    }

    #[test]
    fn few_long_rows_take_the_grid_where_the_tuning_asks() {
        let layout = |tuning| Plan::new(2, 262144, GradKind::Separate, &PlanLimits { tuning, ..lavapipe() });
        let grid = |plan: Plan| match plan.layout {
            Layout::Rows { blocks_per_row, .. } => blocks_per_row,
            Layout::Split { .. } => panic!("split"),
        };
        // GPUs: 64 column blocks of 4096 per row; CPU adapters: whole rows.
        assert_eq!(grid(layout(Tuning::GPU).unwrap()), Some(64));
        assert_eq!(grid(layout(Tuning::CPU).unwrap()), None);
        // 64 rows are no longer few, and 8191 classes are not long.
        let many = Plan::new(64, 262144, GradKind::None, &lavapipe()).unwrap();
        assert_eq!(grid(many), None);
        assert_eq!(grid(Plan::new(2, 8191, GradKind::None, &lavapipe()).unwrap()), None);
    }

    #[test]
    fn probability_targets_are_whole_rows_of_two_inputs() {
        let l = tiny(3);
        let soft = Plan::streaming(1000, 10, Streamed::Probabilities(GradKind::Separate), &l).unwrap();
        check_invariants(&soft, &l);
        assert_eq!(soft.streamed.buffers_per_element(), 4);
        assert_eq!(soft.grad, GradKind::Separate);
        let Layout::Rows { rows_per_chunk, blocks_per_row, .. } = soft.layout else { panic!("{soft:?}") };
        // One workgroup per row: at most 7 × 7 rows a dispatch.
        assert!(rows_per_chunk <= 49, "{soft:?}");
        assert_eq!(blocks_per_row, None, "the grid is the class-index kernels'");
        assert_eq!(soft.chunk_sums(), 1000usize.div_ceil(rows_per_chunk));
        // A second input: fewer rows than class indices in the same budget.
        let big = PlanLimits { max_binding: 1 << 20, max_workgroups_per_dim: 65535, ..l };
        let rows = |p: Plan| match p.layout {
            Layout::Rows { rows_per_chunk, .. } => rows_per_chunk,
            Layout::Split { .. } => 0,
        };
        let classes = rows(Plan::new(100000, 100, GradKind::Separate, &big).unwrap());
        let probs =
            rows(Plan::streaming(100000, 100, Streamed::Probabilities(GradKind::Separate), &big).unwrap());
        assert!(probs < classes, "{probs} {classes}");
        // Rows are never split: a row over one binding, or over the budget, is an error.
        let long = Plan::streaming(3, 40000, Streamed::Probabilities(GradKind::None), &l);
        assert!(matches!(long, Err(Error::TooLarge { .. })), "{long:?}");
        let small = PlanLimits { budget: 3 * 8192, ..l };
        let tight = Plan::streaming(2, 4000, Streamed::Probabilities(GradKind::None), &small);
        assert!(matches!(tight, Err(Error::InvalidOption(_))), "{tight:?}");
    }

    #[test]
    fn binary_targets_take_whole_rows_or_pieces_of_their_own() {
        let l = tiny(3);
        let wg = l.tuning.workgroup_size as usize;
        let streamed = Streamed::Binary { inputs: 3, outputs: 2 };
        assert_eq!(streamed.buffers_per_element(), 7);
        let p = Plan::streaming(1000, 10, streamed, &l).unwrap();
        check_invariants(&p, &l);
        let Layout::Rows { rows_per_chunk, .. } = p.layout else { panic!("{p:?}") };
        // Elementwise: 4 × WG elements a workgroup, within 7 × 7 workgroups.
        assert!(rows_per_chunk * 10 <= 49 * 4 * wg, "{p:?}");
        assert_eq!(p.grad, GradKind::None);
        // Rows over one binding: pieces, each reduced to a sum of its own.
        let p = Plan::streaming(3, 40000, Streamed::Binary { inputs: 2, outputs: 1 }, &l).unwrap();
        check_invariants(&p, &l);
        let Layout::Split { pieces, blocks_per_piece, piece_cols } = p.layout else { panic!("{p:?}") };
        assert_eq!(blocks_per_piece, piece_cols.div_ceil(4 * wg));
        assert_eq!(p.chunk_sums(), 3 * pieces);
        assert_eq!(p.chunks().count(), p.chunk_sums());
        // Spans are contiguous and in order.
        let mut next = 0;
        for chunk in p.chunks() {
            let span = chunk.span(p.classes);
            assert_eq!(span.start, next);
            assert_eq!(span.len(), chunk.rows.len() * chunk.cols.len());
            next = span.end;
        }
        assert_eq!(next, 3 * 40000);
    }

    #[test]
    fn a_budget_that_holds_nothing_is_an_error() {
        let l = PlanLimits { budget: 4, ..tiny(1) };
        assert!(matches!(Plan::new(2, 100, GradKind::None, &l), Err(Error::InvalidOption(_))));
    }

    #[test]
    fn the_plan_is_a_pure_function() {
        let l = tiny(5);
        assert_eq!(
            Plan::new(77, 9999, GradKind::Separate, &l).unwrap(),
            Plan::new(77, 9999, GradKind::Separate, &l).unwrap()
        );
    }
}
