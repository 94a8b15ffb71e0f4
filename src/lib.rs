//! # xent
//!
//! Fused log-softmax + cross-entropy as WGSL compute kernels on any adapter wgpu reaches
//! (Vulkan, Metal, DX12, GL, and Mesa's software lavapipe), with the exact semantics of
//! PyTorch's `F.cross_entropy` (see `shared/docs/semantics.md`), and CPU paths that check
//! and compete with the GPU.
//!
//! - [`GpuContext`]: the device side; one fused kernel reads each row once for the loss
//!   (online softmax) and once more for the gradient, written to a separate buffer or in
//!   place over the logits; `sum`/`mean` are reduced on the device.
//! - [`cpu::reference`]: plain f64 code that validates every GPU result.
//! - [`LossOptions`], [`Targets`], [`LossOutput`], [`Error`]: the vocabulary both share.
//!
//! ```
//! use xent::{LossOptions, Reduction, cpu};
//! let logits = [2.0f32, 0.5, -1.0, /* row 2 */ 0.0, 0.0, 0.0];
//! let targets = [0i64, 2];
//! let out = cpu::reference::cross_entropy(&logits, 3, &targets, &LossOptions::new())?;
//! assert!((out.loss.unwrap() - 0.66996).abs() < 1e-4);
//! # Ok::<(), xent::Error>(())
//! ```
#![warn(missing_docs)]

mod backend;
pub mod check;
pub mod cpu;
mod error;
pub mod gpu;
pub mod npy;
mod options;
pub mod row_state;
pub mod synth;

pub use backend::{Backend, CpuFast, Reference};
pub use error::{Error, Result};
pub use gpu::GpuContext;
pub use options::{
    Batch, DEFAULT_IGNORE_INDEX, HalfFormat, LossOptions, LossOutput, Reduction, Targets, Upstream,
    check_binary, check_soft,
};
pub use row_state::RowState;
