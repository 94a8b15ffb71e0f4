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
mod linear;
mod module;
mod registry;

use burn::tensor::{Int, Tensor};

pub use kernels::{XentArgs, XentOps};
pub use linear::LinearArgs;
#[doc(hidden)]
pub use linear::{HeadPasses, head_passes};
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
    /// Binary (multilabel) targets [N, V] in [0, 1]: binary cross-entropy with logits.
    Binary,
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

/// Binary (multilabel) cross-entropy with logits of `logits` [N, V] against `targets`
/// [N, V] (PyTorch's `binary_cross_entropy_with_logits`), with the options that apply
/// there: class weights (`weight`, per column), `pos_weight`, the reduction and
/// `n_items`. Shape [1, 1] for `mean` (over N·V elements) and `sum`, [N, V] for `none`.
/// Differentiable with respect to the logits.
///
/// # Panics
/// On input that [`try_binary_cross_entropy_with_logits`] refuses.
pub fn binary_cross_entropy_with_logits(
    logits: Tensor<2>,
    targets: Tensor<2>,
    opts: &LossOptions,
) -> Tensor<2> {
    try_binary_cross_entropy_with_logits(logits, targets, opts)
        .unwrap_or_else(|e| panic!("xent_burn::binary_cross_entropy_with_logits: {e}"))
}

/// [`binary_cross_entropy_with_logits`], with bad input as a typed error: shapes that
/// differ, options that do not apply to binary targets (label smoothing, z-loss,
/// softcap, logit scale, `ignore_index`) or do not fit V classes.
pub fn try_binary_cross_entropy_with_logits(
    logits: Tensor<2>,
    targets: Tensor<2>,
    opts: &LossOptions,
) -> Result<Tensor<2>, Error> {
    let (ld, td) = (logits.dims(), targets.dims());
    if ld != td {
        return Err(Error::InvalidOption(format!(
            "binary targets of shape {td:?} for logits of shape {ld:?}"
        )));
    }
    kernels::check_options(ld[1], opts, TargetKind::Binary)?;
    if !is_accelerated(&logits.device()) {
        return Ok(fallback::binary_cross_entropy_with_logits(logits, targets, opts));
    }
    let targets = targets.detach();
    let args = XentArgs::new(opts.clone(), TargetKind::Binary);
    let loss = <burn::backend::Dispatch as XentOps>::xent_forward_binary(
        logits.into_dispatch(),
        targets.into_dispatch(),
        args,
    );
    Ok(Tensor::from_dispatch(loss))
}

/// The most bytes of one block of f32 logits in [`linear_cross_entropy`].
pub const LINEAR_BLOCK_BYTES: usize = 64 << 20;

/// Rows per block of [`linear_cross_entropy`]: the batch in as few blocks as hold at most
/// [`LINEAR_BLOCK_BYTES`] of f32 logits each (at least 64 rows, so that the products stay
/// matrix products), the rows shared evenly, so that the blocks have one shape (burn
/// autotunes its matrix product per shape: minutes on lavapipe). Big blocks keep burn's
/// product efficient: blocks of N / ⌈V / D⌉ rows (Liger's rule, a block's logits about
/// the size of h: 64 rows at 512 × 1024 × 32000) took 80.6 s a step on lavapipe, where
/// burn's whole-batch head takes about 7 s (docs/benchmarks.md).
pub fn linear_block_rows(rows: usize, classes: usize) -> usize {
    let most = (LINEAR_BLOCK_BYTES / (4 * classes.max(1))).max(64);
    let rows = rows.max(1);
    rows.div_ceil(rows.div_ceil(most))
}

/// The LM head's cross-entropy without its logits: `hidden` [N, D], `weight` [V, D]
/// (`nn::Linear`'s layout), an optional `bias` [V] and class indices `targets` [N], with
/// every class-index option of `opts`; the loss of `h Wᵀ + b` is shape [1] for `mean` and
/// `sum`, [N] for `none`, differentiable with respect to `hidden`, `weight` and `bias`.
///
/// On a device where xent runs, the logits exist a block of rows at a time
/// ([`linear_block_rows`]; burn's matrix product, xent's fused kernel) and the
/// backward recomputes them from the saved LSE: no [N, V] tensor at any time. Elsewhere
/// burn's own `linear` and the same loss compute the same numbers (holding the logits).
///
/// # Panics
/// On input that [`try_linear_cross_entropy`] refuses.
pub fn linear_cross_entropy(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    targets: Tensor<1, Int>,
    opts: &LossOptions,
) -> Tensor<1> {
    try_linear_cross_entropy(hidden, weight, bias, targets, opts)
        .unwrap_or_else(|e| panic!("xent_burn::linear_cross_entropy: {e}"))
}

/// [`linear_cross_entropy`], with bad input as a typed error: shapes that disagree (h's
/// D and W's D, b's V and W's V, the targets' N and h's N, each error naming both
/// sizes), h and W of different types, options that do not fit V classes.
pub fn try_linear_cross_entropy(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    targets: Tensor<1, Int>,
    opts: &LossOptions,
) -> Result<Tensor<1>, Error> {
    let (n, v) = (hidden.dims()[0], weight.dims()[0]);
    try_linear_cross_entropy_blocks(hidden, weight, bias, targets, opts, linear_block_rows(n, v))
}

/// [`try_linear_cross_entropy`] in blocks of `block_rows` rows (at least 1).
pub fn try_linear_cross_entropy_blocks(
    hidden: Tensor<2>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    targets: Tensor<1, Int>,
    opts: &LossOptions,
    block_rows: usize,
) -> Result<Tensor<1>, Error> {
    let [n, d] = hidden.dims();
    let [v, dw] = weight.dims();
    let shape = |what: &str, got: usize, expected: usize| Error::Shape { what: what.into(), got, expected };
    if dw != d {
        return Err(shape("weight's hidden dimension (W is [V, D], h [N, D])", dw, d));
    }
    if let Some(b) = &bias {
        let [bv] = b.dims();
        if bv != v {
            return Err(shape("bias length (W's V)", bv, v));
        }
    }
    let [t] = targets.dims();
    if t != n {
        return Err(shape("targets (h's rows)", t, n));
    }
    let dtype = hidden.dtype();
    if weight.dtype() != dtype || bias.as_ref().is_some_and(|b| b.dtype() != dtype) {
        return Err(Error::InvalidOption(format!(
            "h is {dtype:?}, W {:?}{}: the head takes one float type",
            weight.dtype(),
            bias.as_ref().map(|b| format!(", b {:?}", b.dtype())).unwrap_or_default()
        )));
    }
    kernels::check_options(v, opts, TargetKind::Classes)?;
    let device = hidden.device();
    if !is_accelerated(&device) || n == 0 {
        let logits = hidden.matmul(weight.transpose());
        let logits = match bias {
            Some(b) => logits + b.unsqueeze_dim(0),
            None => logits,
        };
        return Ok(fallback::cross_entropy(logits, targets, opts));
    }
    let bias = bias.unwrap_or_else(|| Tensor::<1>::zeros([v], &device).cast(dtype));
    let (denominator, block_z_loss) = linear_denominator(&targets, v, opts);
    let args = LinearArgs {
        opts: opts.clone(),
        block_rows: block_rows.max(1),
        block_z_loss,
        denominator_value: None,
    };
    let (loss, _lse) = <burn::backend::Dispatch as XentOps>::xent_linear_forward(
        hidden.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        targets.into_dispatch(),
        denominator.into_dispatch(),
        args,
    );
    Ok(Tensor::from_dispatch(loss))
}

/// The denominator [1] that divides the blocks' summed loss (on the device: no read
/// back), and the z-loss coefficient of the blocks. `mean` divides the cross-entropy part
/// by Σ w_y over the counted rows and the z-loss part by their number: with class weights
/// and a z-loss both, the blocks take the z coefficient times their ratio (the one value
/// this reads back), so that Σ w_y divides both.
fn linear_denominator(targets: &Tensor<1, Int>, v: usize, opts: &LossOptions) -> (Tensor<1>, f64) {
    let device = targets.device();
    let z = opts.get_z_loss();
    let constant = |x: f64| (Tensor::<1>::from_floats([x as f32], &device), z);
    if opts.get_reduction() != Reduction::Mean {
        return constant(1.0);
    }
    if let Some(k) = opts.get_n_items() {
        return constant(k);
    }
    let ignored = fallback::ignored_rows(targets, v, opts);
    let keep = ignored.clone().bool_not().float();
    let count = keep.clone().sum();
    match opts.get_weights() {
        None => (count, z),
        Some(w) => {
            let safe = targets.clone().mask_fill(ignored, 0);
            let d = (Tensor::<1>::from_floats(w, &device).select(0, safe) * keep).sum();
            if z == 0.0 {
                return (d, z);
            }
            let ratio = f64::from((d.clone() / count).into_scalar::<f32>());
            (d, if ratio.is_finite() { z * ratio } else { z })
        }
    }
}
