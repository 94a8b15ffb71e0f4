//! # xent
//!
//! Fused log-softmax + cross-entropy as WGSL compute kernels on any adapter wgpu reaches
//! (Vulkan, Metal, DX12, GL, and Mesa's software lavapipe), with the exact semantics of
//! PyTorch's `F.cross_entropy` (see `shared/docs/semantics.md`), and CPU paths that check
//! and compete with the GPU.
//!
//! One door: describe the evaluation as a [`Problem`] (the logits as you hold them —
//! f32, f16 or bf16, read-only or mutable —, the labels — class indices, probabilities or
//! binary targets —, where the gradient goes, fused or a separate backward), pass the
//! loss's [`LossOptions`], and call [`Backend::evaluate`] on a path:
//!
//! - [`GpuContext`]: the device side; one fused kernel reads each row once for the loss
//!   (online softmax) and once more for the gradient, written to a separate buffer or in
//!   place over the logits; `sum`/`mean` are reduced on the device. Engines with their own
//!   buffers record into their own encoder ([`GpuContext::record`]).
//! - [`CpuFast`]: the fused multi-threaded CPU path.
//! - [`Reference`]: plain f64 code that validates every other result.
//!
//! Every combination works on every path (the support matrix, [`Cell::all`]); what a
//! path cannot do is a typed [`Error::Unsupported`]. [`BackendExt`] adds the one-line
//! common case.
//!
//! ```
//! use xent::{Backend, BackendExt, Gradient, Labels, Logits, LossOptions, Problem, Reference};
//! let logits = [2.0f32, 0.5, -1.0, /* row 2 */ 0.0, 0.0, 0.0];
//! let targets = [0i64, 2];
//! let out = Reference.cross_entropy(&logits, 3, &targets, &LossOptions::new())?;
//! assert!((out.loss.unwrap() - 0.66996).abs() < 1e-4);
//!
//! // Half-precision logits, the gradient rounded once into their own type:
//! let half: Vec<u16> = logits.iter().map(|&x| xent::HalfFormat::F16.from_f32(x)).collect();
//! let mut grad = vec![0u16; 6];
//! let problem = Problem::new(Logits::Half(&half, xent::HalfFormat::F16), 3, Labels::from(&targets))
//!     .gradient(Gradient::IntoHalf(&mut grad));
//! Reference.evaluate(problem, &LossOptions::new())?;
//! # Ok::<(), xent::Error>(())
//! ```
#![warn(missing_docs)]

mod backend;
pub mod check;
pub mod collective;
mod cpu;
mod error;
mod front;
pub mod gpu;
mod head;
pub mod metrics;
pub mod npy;
mod options;
pub mod parallel;
mod problem;
pub mod row_state;
mod shard;
pub mod synth;
pub mod vocab;
mod vocab_shards;

pub use backend::{Backend, BackendExt, CpuFast, Reference};
pub use error::{Error, Result};
#[doc(hidden)]
pub use front::set_block_elems;
pub use gpu::GpuContext;
pub use head::{GradientTo, HeadGradients, LinearHead, Values};
pub use metrics::{Metrics, MetricsSpec, RowMetrics};
pub use options::{
    Batch, DEFAULT_IGNORE_INDEX, HalfFormat, LossOptions, LossOutput, Reduction, Targets, Upstream,
    check_binary, check_soft,
};
pub use problem::{
    Cell, Dtype, Gradient, Input, LabelKind, Labels, Logits, LogitsRef, Mode, Output, Problem,
};
pub use row_state::RowState;
pub use shard::RowShards;
pub use vocab_shards::VocabShards;
