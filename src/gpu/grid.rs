//! The (row × column block) grid of workgroups for few long rows: partial states, a
//! merge per row, and the gradient over the same grid. Used by the host driver and the
//! device-resident path.

use super::buffers::{Recorder, groups_x};
use super::kernels::{BackwardParams, GradMode, KernelOpts, Kernels, MergeParams, NO_ENTRY, PartialParams};
use super::tuning::SPLIT_BLOCK_COLS;

/// One problem on the (row × column block) grid: few long rows.
pub(crate) struct RowGrid {
    pub rows: usize,
    pub classes: usize,
    /// The target value that marks an ignored row in the bound targets.
    pub ignore_index: i32,
    /// Scale of the gradient (the upstream gradient over the divisor).
    pub grad_scale: f32,
    pub mode: GradMode,
    /// The metrics' parts and each row's record (bound to the merge).
    pub metrics: bool,
}

impl RowGrid {
    /// Column blocks per row.
    pub fn blocks(&self) -> usize {
        self.classes.div_ceil(SPLIT_BLOCK_COLS)
    }

    /// Workgroups of the grid: one per (row, column block).
    pub fn workgroups(&self) -> u64 {
        (self.rows * self.blocks()) as u64
    }

    /// `cross_entropy_backward.wgsl`'s parameters over the grid of these whole rows,
    /// the first at batch row `row_base`; `per_row` 1 scales each row by its bound
    /// upstream gradient.
    pub fn backward_params(
        &self,
        row_base: usize,
        per_row: u32,
        kopts: &KernelOpts,
        max_dim: u32,
    ) -> BackwardParams {
        let (v, bpr) = (self.classes as u32, self.blocks() as u32);
        BackwardParams {
            rows: self.rows as u32,
            row_stride: v,
            cols: v,
            col_base: 0,
            block_cols: SPLIT_BLOCK_COLS as u32,
            blocks: bpr,
            row_base: row_base as u32,
            groups_x: groups_x(self.workgroups(), max_dim),
            scale: self.grad_scale,
            grad_mode: self.mode as u32,
            ignore_index: self.ignore_index,
            classes: v,
            per_row,
            ..bytemuck::Zeroable::zeroed()
        }
        .with_opts(kopts)
    }
}

/// Records the grid path: partial states over a (row × block) grid, a merge per row, and
/// the gradient over the same grid — 1 read for the loss, 2 reads + 1 write with the
/// gradient, as the fused kernel, but with `rows × blocks` workgroups. `groups` binds
/// `row_partials`, `merge_partials` and `cross_entropy_backward`, in that order.
pub(crate) fn record_row_grid(
    rec: &mut Recorder<'_>,
    kernels: &Kernels,
    [partials_bg, merge_bg, backward_bg]: [&wgpu::BindGroup; 3],
    grid: RowGrid,
    kopts: &KernelOpts,
    max_dim: u32,
) {
    let RowGrid { rows, classes: v, ignore_index, mode, metrics, .. } = grid;
    let bpr = grid.blocks();
    let wgs = grid.workgroups();
    let partial = PartialParams {
        rows: rows as u32,
        row_stride: v as u32,
        cols: v as u32,
        col_base: 0,
        block_cols: SPLIT_BLOCK_COLS as u32,
        blocks: bpr as u32,
        row_base: 0,
        groups_x: groups_x(wgs, max_dim),
        out_base: 0,
        out_stride: bpr as u32,
        ignore_index,
        classes: v as u32,
        metrics: u32::from(metrics),
        zt_entry: NO_ENTRY,
        ..bytemuck::Zeroable::zeroed()
    }
    .with_opts(kopts);
    rec.dispatch(&kernels.partials, partials_bg, &partial, wgs);
    let merge_groups = (rows as u64).div_ceil(u64::from(kernels.workgroup_size));
    let merge = MergeParams {
        rows: rows as u32,
        blocks: bpr as u32,
        row_base: 0,
        groups_x: groups_x(merge_groups, max_dim),
        classes: v as u32,
        ignore_index,
        metrics: u32::from(metrics),
        ..bytemuck::Zeroable::zeroed()
    }
    .with_opts(kopts);
    rec.dispatch(&kernels.merge, merge_bg, &merge, merge_groups);
    if mode != GradMode::None {
        let backward = grid.backward_params(0, 0, kopts, max_dim);
        rec.dispatch(&kernels.backward, backward_bg, &backward, wgs);
    }
}
