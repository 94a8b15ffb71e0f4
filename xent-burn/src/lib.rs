//! xent inside burn: a drop-in fused cross-entropy for burn 0.22, forward and autodiff
//! backward.
//!
//! ```no_run
//! use burn::tensor::{Int, Tensor};
//! use xent::LossOptions;
//!
//! // burn's wgpu runtime and xent on one device and queue.
//! let device = xent_burn::init_wgpu(Default::default()).unwrap().autodiff();
//! let logits = Tensor::<2>::random([8, 100], burn::tensor::Distribution::Default, &device).require_grad();
//! let targets = Tensor::<1, Int>::from_ints([1, 2, 3, 4, 5, 6, 7, 8], &device);
//! let loss = xent_burn::cross_entropy(logits.clone(), targets, &LossOptions::new().label_smoothing(0.1));
//! let grads = loss.backward();
//! let _dlogits = logits.grad(&grads).unwrap();
//! ```
//!
//! On a wgpu device created by [`init_wgpu`] (or registered with [`register`]) the loss
//! and its gradient are xent's kernels, recorded over burn's own buffers (no copy
//! through the host, no second [N, V] buffer beyond the gradient) and submitted on burn's
//! queue after burn's pending work, so that burn's later work sees them (see
//! [`XentOps`]). On any other device — NdArray, CUDA, a wgpu device xent does not know —
//! the same functions compute the same numbers with burn's own tensor operations
//! ([`is_accelerated`] tells which), so code stays portable.

mod fallback;
mod kernels;
mod module;
mod registry;

use burn::tensor::{Int, Tensor};

pub use kernels::{XentArgs, XentOps};
pub use module::{CrossEntropyLoss, CrossEntropyLossConfig};
pub use registry::{init_wgpu, is_accelerated, register, xent_buffer_allocations, xent_device_bytes};
pub use xent::{Error, LossOptions, Reduction};

/// What the targets of a call are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// Class indices [N] (`ignore_index` applies).
    Classes,
    /// Probabilities [N, V].
    Probabilities,
}

/// Cross-entropy of `logits` [N, V] against class indices `targets` [N], with every
/// option of `opts` (`ignore_index`, class weights, label smoothing, z-loss, softcap,
/// logit scale, the three reductions, `n_items`): shape [1] for `mean` and `sum`, [N]
/// for `none`. Differentiable with respect to the logits on an autodiff device.
///
/// # Panics
/// On input that [`try_cross_entropy`] refuses (shapes, options), with its message.
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>, opts: &LossOptions) -> Tensor<1> {
    try_cross_entropy(logits, targets, opts).unwrap_or_else(|e| panic!("xent_burn::cross_entropy: {e}"))
}

/// [`cross_entropy`], with bad input as a typed error: targets whose length is not the
/// logits' rows, options that do not fit V classes (class weights of another length,
/// label smoothing outside [0, 1], …). Target values live on the device and are not read
/// back: on the xent path a target outside [0, V) that is not `ignore_index` counts as
/// ignored; on the fallback path it is clamped by burn's gather.
pub fn try_cross_entropy(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    opts: &LossOptions,
) -> Result<Tensor<1>, Error> {
    let [n, v] = logits.dims();
    let [t] = targets.dims();
    if t != n {
        return Err(Error::InvalidOption(format!("targets have {t} rows, the logits {n}")));
    }
    kernels::check_options(v, opts, TargetKind::Classes)?;
    if !is_accelerated(&logits.device()) {
        return Ok(fallback::cross_entropy(logits, targets, opts));
    }
    let args = XentArgs::new(opts.clone(), TargetKind::Classes);
    let (loss, _lse) = <burn::backend::Dispatch as XentOps>::xent_forward(
        logits.into_dispatch(),
        targets.into_dispatch(),
        args,
    );
    Ok(Tensor::from_dispatch(loss))
}

/// Cross-entropy of `logits` [N, V] against probability targets `targets` [N, V] (every
/// option but `ignore_index`; `mean` divides by N): shape [1] for `mean` and `sum`, [N]
/// for `none`. Differentiable with respect to the logits.
///
/// # Panics
/// On input that [`try_cross_entropy_probs`] refuses.
pub fn cross_entropy_probs(logits: Tensor<2>, targets: Tensor<2>, opts: &LossOptions) -> Tensor<1> {
    try_cross_entropy_probs(logits, targets, opts)
        .unwrap_or_else(|e| panic!("xent_burn::cross_entropy_probs: {e}"))
}

/// [`cross_entropy_probs`], with bad input as a typed error.
pub fn try_cross_entropy_probs(
    logits: Tensor<2>,
    targets: Tensor<2>,
    opts: &LossOptions,
) -> Result<Tensor<1>, Error> {
    let (ld, td) = (logits.dims(), targets.dims());
    if ld != td {
        return Err(Error::InvalidOption(format!(
            "probability targets of shape {td:?} for logits of shape {ld:?}"
        )));
    }
    kernels::check_options(ld[1], opts, TargetKind::Probabilities)?;
    if !is_accelerated(&logits.device()) {
        return Ok(fallback::cross_entropy_probs(logits, targets, opts));
    }
    // The targets are data, not parameters: no gradient flows into them.
    let targets = targets.detach();
    let args = XentArgs::new(opts.clone(), TargetKind::Probabilities);
    let (loss, _lse) = <burn::backend::Dispatch as XentOps>::xent_forward_probs(
        logits.into_dispatch(),
        targets.into_dispatch(),
        args,
    );
    Ok(Tensor::from_dispatch(loss))
}
