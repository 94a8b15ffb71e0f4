//! The buffers and bind groups that calls reuse: plain data over [`Slot`]s, prepared by
//! the drivers that use them.

use super::buffers::Slot;

/// Buffers and bind groups reused across calls.
#[derive(Default)]
pub(crate) struct Workspace {
    pub logits: Slot,
    pub grad: Slot,
    pub targets: Slot,
    pub row_loss: Slot,
    pub row_lse: Slot,
    pub row_weight: Slot,
    pub row_stats: Slot,
    pub scratch: Slot,
    pub partials: Slot,
    pub sums: Slot,
    pub norm: Slot,
    pub weights: Slot,
    pub upstream: Slot,
    /// Two vec4 per row of evaluation metrics (where the adapter binds them).
    pub row_metrics: Slot,
    /// Their sums: one entry per chunk, then the reduction's scratch.
    pub metric_entries: Slot,
    pub params: Slot,
    pub readback: Vec<Slot>,
    pub groups: Option<BindGroups>,
    pub binary: BinaryWorkspace,
    pub soft: SoftWorkspace,
    pub linear: LinearWorkspace,
    /// Buffers created so far (a steady state of same-shape calls creates none).
    pub allocations: u64,
    /// The least bytes of `partials` and of each readback slot the next `prepare` makes
    /// (the vocabulary shards' entries, which their plans do not count).
    pub entries_floor: u64,
}

impl Workspace {
    /// Drops every buffer (kept: the allocation count), after an error or to free memory.
    pub fn release(&mut self) {
        *self = Workspace { allocations: self.allocations, ..Workspace::default() };
    }
}

/// The bind groups of the class-index kernels over a [`Workspace`]'s buffers.
pub(crate) struct BindGroups {
    pub rows: wgpu::BindGroup,
    /// The fused kernel's with the metrics binding, where the adapter has it.
    pub rows_metrics: Option<wgpu::BindGroup>,
    /// `reduce_metrics` over the records and the entries.
    pub metrics_reduce: wgpu::BindGroup,
    pub partials: wgpu::BindGroup,
    pub merge: wgpu::BindGroup,
    pub backward: wgpu::BindGroup,
    pub reduce_scratch: wgpu::BindGroup,
    pub reduce_sums: wgpu::BindGroup,
}

/// Buffers of the soft-target path, reused across calls.
#[derive(Default)]
pub(crate) struct SoftWorkspace {
    pub logits: Slot,
    pub probs: Slot,
    pub row_loss: Slot,
    pub row_lse: Slot,
    pub grad: Slot,
    pub weights: Slot,
    pub upstream: Slot,
    pub scratch: Slot,
    pub sums: Slot,
    /// The metric records (32 bytes when not asked).
    pub row_metrics: Slot,
    /// Their sums: one entry per chunk, then the reduction's scratch (16 bytes when not
    /// asked).
    pub metric_entries: Slot,
    /// `reduce_metrics` over the records and the entries.
    pub metrics_group: Option<wgpu::BindGroup>,
    pub params: Slot,
    /// One per chunk in flight.
    pub readback: Vec<Slot>,
    /// The soft kernel's, and `reduce_sum` over `scratch` and over `sums`.
    pub groups: Option<[wgpu::BindGroup; 3]>,
}

/// Buffers of the binary path, reused across calls.
#[derive(Default)]
pub(crate) struct BinaryWorkspace {
    pub logits: Slot,
    pub targets: Slot,
    pub weights: Slot,
    pub pos_weight: Slot,
    pub grad: Slot,
    pub losses: Slot,
    pub partials: Slot,
    pub upstream: Slot,
    pub sums: Slot,
    pub params: Slot,
    /// One per chunk in flight.
    pub readback: Vec<Slot>,
    /// The binary kernel's, and `reduce_sum` over `partials` and over `sums`.
    pub groups: Option<[wgpu::BindGroup; 3]>,
}

/// Buffers of the linear head, reused across calls: one slot per buffer of
/// `linear::Buffers`, in its order, and the readback slots.
#[derive(Default)]
pub(crate) struct LinearWorkspace {
    pub slots: [Slot; 23],
    pub readback: Vec<Slot>,
}
