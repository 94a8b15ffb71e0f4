//! The loss as a burn backend extension: xent's kernels on burn's wgpu buffers.
//!
//! [`XentOps`] is routed by burn's `Dispatch` to one of three implementations:
//! - `CubeBackend` (burn's wgpu backend): the inputs made contiguous by burn, their
//!   `wgpu::Buffer`s and offsets taken from burn's allocator (`get_resource`, which also
//!   submits the work burn has batched for them), outputs allocated in burn's pool, xent's
//!   passes recorded with [`xent::GpuContext::record`] over those buffers into a command
//!   buffer of our own and submitted on burn's queue before the outputs go back to burn.
//!   One queue executes in order: burn's earlier kernels have run before xent reads, and
//!   burn's later work, submitted after, sees xent's writes.
//! - `Fusion<CubeBackend>` (burn's `fusion`, generated): a custom operation of the fusion
//!   stream that calls the above when the stream reaches it, with the real tensors.
//! - `Autodiff<B>`: the forward through `B`, computing ∂loss/∂logits in the same pass
//!   over the logits under `mean`/`sum` (Liger-style; the LM head its dh, dW and db), and a
//!   backward that registers it for the logits (or h, W, b).
//!
//! The loss of `mean`/`sum` is shape [1]. Its backward reads burn's upstream gradient
//! (one float): exactly 1 — `loss.backward()` on the loss itself — and the forward's
//! gradient is the answer; any other value goes to xent's saved-LSE backward kernel as its
//! scale. Under `none` the upstream [N] goes to that kernel as one value per row. burn's
//! broadcast multiply of [N, V] is never used: on lavapipe it costs more than the loss.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::wgpu::{CubeBackend, CubeTensor, into_contiguous, wgpu};
use burn::backend::{Autodiff, AutodiffBackend, Backend, TensorMetadata, backend_extension};
use burn::cubecl::wgpu::{AutoCompiler, WgpuServer};
use burn::tensor::{DType, Shape};
use xent::gpu::{
    DeviceGradient, DeviceLabels, DeviceLogits, DeviceMode, DeviceProblem, DeviceSlice, DeviceUpstream,
};
use xent::{Backend as _, Dtype, Error, Labels, Logits, LossOptions, Problem, Reduction};

use crate::TargetKind;
use crate::linear::{self, LinearArgs};
use crate::registry::{Engine, Private, engine};

/// The options of a call, carried to the device (and by the fusion stream's closure).
#[derive(Clone, Debug)]
pub struct XentArgs {
    /// The loss options.
    pub opts: LossOptions,
    /// The kind of the targets.
    pub kind: TargetKind,
    /// A `mean`/`sum` backward's upstream gradient, when the caller has read it already
    /// (the LM head reads it once for all its row blocks); `None`: the kernels read it
    /// from the upstream tensor, one wait for the device.
    pub upstream: Option<f32>,
}

impl XentArgs {
    /// Options for targets of `kind`.
    pub fn new(opts: LossOptions, kind: TargetKind) -> Self {
        Self { opts, kind, upstream: None }
    }

    fn reduced(&self) -> bool {
        self.opts.get_reduction() != Reduction::None
    }
}

/// Options that cannot apply to `classes` classes (or to the targets' kind) are refused
/// before anything is recorded: the same checks as xent's own paths, on an empty batch.
pub(crate) fn check_options(classes: usize, opts: &LossOptions, kind: TargetKind) -> Result<(), Error> {
    if opts.get_metrics().is_some() {
        return Err(Error::InvalidOption(
            "xent_burn returns the loss; evaluation metrics come from xent's own API".into(),
        ));
    }
    let no_classes: [i64; 0] = [];
    let labels = match kind {
        TargetKind::Classes => Labels::from(&no_classes[..]),
        TargetKind::Probabilities => Labels::Probabilities(&[]),
        TargetKind::Binary => Labels::Binary(&[]),
    };
    xent::Reference.evaluate(Problem::new(Logits::F32(&[]), classes, labels), opts).map(|_| ())
}

#[cfg(feature = "fusion")]
use burn::backend::fusion::custom::TensorSpec;

/// Output shapes of a forward: the loss ([1] reduced, [N] for `none`) and the LSE [N],
/// both f32.
#[cfg(feature = "fusion")]
fn forward_meta(logits: &TensorSpec, _targets: &TensorSpec, args: &XentArgs) -> (TensorSpec, TensorSpec) {
    let n = logits.shape[0];
    let loss = if args.reduced() { 1 } else { n };
    (TensorSpec::new(Shape::new([loss]), DType::F32), TensorSpec::new(Shape::new([n]), DType::F32))
}

/// The outputs of a forward with its gradient: the loss, the LSE and ∂loss/∂logits (the
/// logits' shape and type).
#[cfg(feature = "fusion")]
fn forward_grad_meta(
    logits: &TensorSpec,
    targets: &TensorSpec,
    args: &XentArgs,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    let (loss, lse) = forward_meta(logits, targets, args);
    (loss, lse, logits.clone())
}

/// The output of a binary forward: the loss [1, 1] reduced, the element losses [N, V]
/// for `none`, f32.
#[cfg(feature = "fusion")]
fn binary_meta(logits: &TensorSpec, _targets: &TensorSpec, args: &XentArgs) -> TensorSpec {
    let shape = if args.reduced() { Shape::new([1, 1]) } else { logits.shape.clone() };
    TensorSpec::new(shape, DType::F32)
}

/// The outputs of a linear head's forward: the loss ([1] reduced, [N] for `none`) and
/// the LSE [N], f32.
#[cfg(feature = "fusion")]
fn linear_meta(
    hidden: &TensorSpec,
    _w: &TensorSpec,
    _b: &TensorSpec,
    _t: &TensorSpec,
    _d: &TensorSpec,
    args: &LinearArgs,
) -> (TensorSpec, TensorSpec) {
    let n = hidden.shape[0];
    let loss = if args.opts.get_reduction() != Reduction::None { 1 } else { n };
    (TensorSpec::new(Shape::new([loss]), DType::F32), TensorSpec::new(Shape::new([n]), DType::F32))
}

/// The outputs of a linear head's forward with its gradients: the loss [1], the LSE [N]
/// (f32) and the gradients of h, W and b (each of its input's shape and type).
#[cfg(feature = "fusion")]
fn linear_forward_grad_meta(
    hidden: &TensorSpec,
    weight: &TensorSpec,
    bias: &TensorSpec,
    t: &TensorSpec,
    args: &LinearArgs,
) -> (TensorSpec, TensorSpec, TensorSpec, TensorSpec, TensorSpec) {
    let (loss, lse) = linear_meta(hidden, weight, bias, t, t, args);
    (loss, lse, hidden.clone(), weight.clone(), bias.clone())
}

/// The gradients of a linear head: those of h, W and b, each of its input's shape and type.
#[cfg(feature = "fusion")]
#[allow(clippy::too_many_arguments)]
fn linear_grad_meta(
    hidden: &TensorSpec,
    weight: &TensorSpec,
    bias: &TensorSpec,
    _t: &TensorSpec,
    _d: &TensorSpec,
    _lse: &TensorSpec,
    _up: &TensorSpec,
    _args: &LinearArgs,
) -> (TensorSpec, TensorSpec, TensorSpec) {
    (hidden.clone(), weight.clone(), bias.clone())
}

/// xent's loss on a backend: the forward (loss, LSE) and the backward from the saved LSE
/// (the gradient over the logits, in their type, times the upstream gradient), for class
/// indices and for probability targets; binary cross-entropy with logits, whose backward
/// recomputes from the logits.
#[backend_extension(Cube, Fusion: cfg(feature = "fusion"), Autodiff)]
pub trait XentOps: Backend {
    /// The loss of `logits` [N, V] against class indices `targets` [N], and each row's LSE.
    #[fusion(meta = forward_meta)]
    fn xent_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// ∂loss/∂logits times `upstream` ([1], or [N] for `none`), from the saved `lse`.
    #[fusion(dtype = logits, shape = logits)]
    fn xent_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentArgs,
    ) -> FloatTensor<Self>;

    /// [`XentOps::xent_forward`] with ∂loss/∂logits (upstream 1, per row for `none`) from
    /// the same pass over the logits, in their type: the autodiff forward's, whose
    /// backward then only scales it by the upstream gradient.
    #[fusion(meta = forward_grad_meta)]
    fn xent_forward_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// [`XentOps::xent_forward_grad`] against probability targets [N, V].
    #[fusion(meta = forward_grad_meta)]
    fn xent_forward_grad_probs(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// [`XentOps::xent_forward`] against probability targets [N, V].
    #[fusion(meta = forward_meta)]
    fn xent_forward_probs(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// [`XentOps::xent_backward`] against probability targets [N, V].
    #[fusion(dtype = logits, shape = logits)]
    fn xent_backward_probs(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentArgs,
    ) -> FloatTensor<Self>;

    /// Binary cross-entropy with logits of `logits` [N, V] against `targets` [N, V]: the
    /// loss [1, 1] under `mean`/`sum`, the element losses [N, V] under `none`.
    #[fusion(meta = binary_meta)]
    fn xent_forward_binary(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        args: XentArgs,
    ) -> FloatTensor<Self>;

    /// ∂loss/∂logits of [`XentOps::xent_forward_binary`] times `upstream` ([1, 1], or
    /// [N, V] for `none`).
    #[fusion(dtype = logits, shape = logits)]
    fn xent_backward_binary(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentArgs,
    ) -> FloatTensor<Self>;

    /// The LM head's loss of `hidden` [N, D], `weight` [V, D] and `bias` [V] against class
    /// indices [N], and each row's LSE, a block of rows at a time (see `linear.rs`);
    /// `denominator` [1] divides the sum under `mean` (1 otherwise).
    #[fusion(meta = linear_meta)]
    fn xent_linear_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        denominator: FloatTensor<Self>,
        args: LinearArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);

    /// [`XentOps::xent_linear_forward`] under `mean`/`sum` with the gradients of its loss
    /// (upstream 1) from the same pass, Liger's way: (loss, LSE, dh, dW, db). The
    /// denominator's value is in `args` ([`LinearArgs::denominator_value`]).
    #[fusion(meta = linear_forward_grad_meta)]
    #[allow(clippy::type_complexity)]
    fn xent_linear_forward_grad(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: LinearArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// (dh, dW, db) of [`XentOps::xent_linear_forward`] times `upstream` ([1], or [N] for
    /// `none`), from the saved `lse`, the logits recomputed block by block.
    #[fusion(meta = linear_grad_meta)]
    #[allow(clippy::too_many_arguments)]
    fn xent_linear_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        denominator: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: LinearArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The engine of a tensor's device (the public functions checked it exists).
fn engine_of(t: &CubeTensor) -> std::sync::Arc<Engine> {
    match &t.device {
        burn::cubecl::Device::Wgpu(w) => engine(w).unwrap_or_else(|| {
            panic!("xent_burn: the wgpu device {w:?} is not registered (xent_burn::init_wgpu)")
        }),
        other => panic!("xent_burn: the xent kernels run on wgpu devices, not {other:?}"),
    }
}

/// xent's element type of burn's.
fn xent_dtype(dtype: DType) -> Dtype {
    match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::Bf16,
        other => panic!("xent_burn: logits of {other:?}; xent takes f32, f16 and bf16"),
    }
}

/// (rows, classes) of a 2D tensor.
fn rows_classes(t: &CubeTensor) -> (usize, usize) {
    let shape = TensorMetadata::shape(t);
    (shape[0], shape[1])
}

/// A new contiguous tensor of `shape` and `dtype` in burn's pool on `like`'s device
/// (uninitialised: xent writes all of it).
fn empty_like(like: &CubeTensor, shape: Shape, dtype: DType) -> CubeTensor {
    let bytes = (shape.num_elements() * dtype.size()).max(4);
    let client = like.client.clone();
    CubeTensor::new_contiguous(client.clone(), like.device.clone(), shape, client.empty(bytes), dtype)
}

/// The labels of a call on burn's wgpu backend, made contiguous.
enum CubeLabels {
    Classes(CubeTensor),
    Probabilities(CubeTensor),
    Binary(CubeTensor),
}

impl CubeLabels {
    fn tensor(&self) -> &CubeTensor {
        match self {
            CubeLabels::Classes(t) | CubeLabels::Probabilities(t) | CubeLabels::Binary(t) => t,
        }
    }

    fn contiguous(self) -> Self {
        match self {
            CubeLabels::Classes(t) => CubeLabels::Classes(into_contiguous(t)),
            CubeLabels::Probabilities(t) => CubeLabels::Probabilities(into_contiguous(t)),
            CubeLabels::Binary(t) => CubeLabels::Binary(into_contiguous(t)),
        }
    }

    fn binary(&self) -> bool {
        matches!(self, CubeLabels::Binary(_))
    }
}

/// A buffer's resource in burn's allocator: pinned while held, and burn's batched work
/// touching it submitted.
type Resource = cubecl_runtime::storage::ManagedResource<burn::backend::wgpu::WgpuResource>;

fn resource(t: &CubeTensor) -> Resource {
    t.client
        .get_resource::<WgpuServer<AutoCompiler>>(t.handle.clone())
        .unwrap_or_else(|e| panic!("xent_burn: burn's buffer of a tensor: {e:?}"))
}

fn slice(r: &Resource) -> DeviceSlice<'_> {
    let w = r.resource();
    DeviceSlice::new(&w.buffer, w.offset)
}

/// `bytes` from `src` into a burn tensor's resource.
fn copy_into(enc: &mut wgpu::CommandEncoder, src: &wgpu::Buffer, dst: &Resource, bytes: u64) {
    if bytes > 0 {
        let d = dst.resource();
        enc.copy_buffer_to_buffer(src, 0, &d.buffer, d.offset, bytes);
    }
}

/// What one recording computes.
enum Pass<'a> {
    Forward,
    /// The forward's (loss, LSE) and the gradient of the loss (upstream 1) in one pass.
    ForwardGrad,
    /// The LSE is `None` for binary targets.
    Backward {
        lse: Option<&'a CubeTensor>,
        upstream: &'a CubeTensor,
    },
}

/// Records xent over burn's buffers and submits it on burn's queue: the forward's
/// (loss, LSE) (the loss alone for binary targets), with the gradient as a third output
/// for `ForwardGrad`, or the backward's gradient.
fn run(logits: CubeTensor, labels: CubeLabels, pass: Pass<'_>, args: &XentArgs) -> Vec<CubeTensor> {
    let engine = engine_of(&logits);
    // A cubecl graph replays cubecl's launches only: xent's own command buffer would be
    // missing from it (wgpu has no graphs today; this keeps it so if it gains them).
    assert!(
        !logits.client.is_capturing(),
        "xent_burn: the loss records its own wgpu commands and cannot run inside a cubecl graph capture"
    );
    let ctx = &engine.ctx;
    let device = ctx.device();
    // Row major, untiled (a matmul's output may be storage-tiled).
    let logits = into_contiguous(logits);
    let labels = labels.contiguous();
    let binary = labels.binary();
    let (n, v) = rows_classes(&logits);
    let dtype = xent_dtype(logits.dtype);
    let outputs: Vec<CubeTensor> = match (&pass, binary) {
        (Pass::Forward, false) => vec![
            empty_like(&logits, Shape::new([if args.reduced() { 1 } else { n }]), DType::F32),
            empty_like(&logits, Shape::new([n]), DType::F32),
        ],
        (Pass::Forward, true) => {
            let shape = if args.reduced() { Shape::new([1, 1]) } else { Shape::new([n, v]) };
            vec![empty_like(&logits, shape, DType::F32)]
        }
        (Pass::ForwardGrad, false) => vec![
            empty_like(&logits, Shape::new([if args.reduced() { 1 } else { n }]), DType::F32),
            empty_like(&logits, Shape::new([n]), DType::F32),
            empty_like(&logits, Shape::new([n, v]), logits.dtype),
        ],
        (Pass::ForwardGrad, true) => unreachable!("binary targets' backward recomputes"),
        (Pass::Backward { .. }, _) => vec![empty_like(&logits, Shape::new([n, v]), logits.dtype)],
    };
    // Which output takes the gradient.
    let grad_out = match pass {
        Pass::Forward => None,
        Pass::ForwardGrad => Some(2),
        Pass::Backward { .. } => Some(0),
    };
    let (lse, upstream) = match pass {
        Pass::Backward { lse, upstream } => {
            (lse.map(|l| into_contiguous(l.clone())), Some(into_contiguous(upstream.clone())))
        }
        Pass::Forward | Pass::ForwardGrad => (None, None),
    };
    if let Some(u) = &upstream {
        assert_eq!(u.dtype, DType::F32, "xent_burn: an upstream gradient of {:?}; xent takes f32", u.dtype);
    }
    // Every buffer pinned (and burn's work on it submitted) until ours is submitted.
    let r_logits = resource(&logits);
    let r_labels = resource(labels.tensor());
    let r_out: Vec<Resource> = outputs.iter().map(resource).collect();
    let r_lse = lse.as_ref().map(resource);
    let r_up = upstream.as_ref().map(resource);

    let mut guard = engine.workspace.lock().unwrap_or_else(|p| p.into_inner());
    let (ws, private) = &mut *guard;
    let scope = (
        device.push_error_scope(wgpu::ErrorFilter::Validation),
        device.push_error_scope(wgpu::ErrorFilter::OutOfMemory),
    );
    let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("xent-burn") });
    // The small inputs the kernels read, in buffers of our own (see `Private`).
    let mut own = |enc: &mut wgpu::CommandEncoder, slot: usize, r: &Resource, bytes: u64| {
        let b = private.buffer(device, slot, bytes);
        let w = r.resource();
        if bytes > 0 {
            enc.copy_buffer_to_buffer(&w.buffer, w.offset, &b, 0, bytes);
        }
        b
    };
    let label_bytes = n as u64 * labels.tensor().dtype.size() as u64;
    let targets_own = match &labels {
        CubeLabels::Classes(_) => Some(own(&mut enc, Private::TARGETS, &r_labels, label_bytes)),
        CubeLabels::Probabilities(_) | CubeLabels::Binary(_) => None,
    };
    let lse_own = r_lse.as_ref().map(|r| own(&mut enc, Private::LSE, r, n as u64 * 4));
    // Per row under `none` (cross-entropy); binary targets' per-element upstream [N, V]
    // is read where burn keeps it.
    let up_own = match (&r_up, args.reduced()) {
        (Some(r), false) if !binary => Some(own(&mut enc, Private::UPSTREAM, r, n as u64 * 4)),
        _ => None,
    };
    let device_labels = match &labels {
        CubeLabels::Classes(t) => {
            let own = DeviceSlice::from(targets_own.as_ref().unwrap_or_else(|| unreachable!()));
            match t.dtype {
                DType::I32 => DeviceLabels::ClassesI32(own),
                DType::I64 => DeviceLabels::ClassesI64(own),
                other => panic!("xent_burn: class indices of {other:?}; xent takes i32 and i64"),
            }
        }
        CubeLabels::Probabilities(t) => {
            assert_eq!(t.dtype, DType::F32, "xent_burn: probability targets must be f32");
            DeviceLabels::Probabilities(slice(&r_labels))
        }
        CubeLabels::Binary(t) => {
            assert_eq!(t.dtype, DType::F32, "xent_burn: binary targets must be f32");
            DeviceLabels::Binary(slice(&r_labels))
        }
    };
    // The probability and binary kernels read their logits, targets (and upstream)
    // read-only: a gradient in a buffer that holds one of them goes through a buffer of
    // our own.
    let grad_bytes = (n * v * logits.dtype.size()) as u64;
    let grad_private = match (grad_out, &labels) {
        (Some(g), CubeLabels::Probabilities(_) | CubeLabels::Binary(_)) => {
            let out = &r_out[g].resource().buffer;
            let mut inputs = vec![&r_logits, &r_labels];
            inputs.extend(r_up.as_ref().filter(|_| up_own.is_none()));
            inputs
                .iter()
                .any(|r| r.resource().buffer == *out)
                .then(|| private.buffer(device, Private::GRAD, grad_bytes.next_multiple_of(4)))
        }
        _ => None,
    };
    let gradient = match grad_out {
        Some(g) => {
            let into = match &grad_private {
                Some(b) => DeviceSlice::from(b),
                None => slice(&r_out[g]),
            };
            if dtype == Dtype::F32 { DeviceGradient::Into(into) } else { DeviceGradient::IntoHalf(into) }
        }
        None => DeviceGradient::None,
    };
    let backward = matches!(pass, Pass::Backward { .. });
    let mode = match (&lse_own, backward) {
        (lse, true) => {
            let upstream = match (&up_own, &r_up) {
                (Some(u), _) => DeviceUpstream::PerRow(DeviceSlice::from(u)),
                (None, Some(u)) if binary && !args.reduced() => DeviceUpstream::PerElement(slice(u)),
                // `mean`/`sum`: burn's upstream [1], read here (a wait for the work before
                // it) and scaled in the kernel — burn's broadcast multiply of [N, V] costs
                // more than the whole loss on lavapipe.
                _ => DeviceUpstream::Scalar(
                    args.upstream.unwrap_or_else(|| upstream.as_ref().map_or(1.0, scalar::<CubeBackend>)),
                ),
            };
            DeviceMode::Backward { lse: lse.as_ref().map(DeviceSlice::from), upstream }
        }
        (_, false) => DeviceMode::Fused,
    };
    let w = r_logits.resource();
    let problem = DeviceProblem {
        logits: DeviceLogits { buffer: &w.buffer, offset: w.offset, dtype },
        rows: n,
        classes: v,
        labels: device_labels,
        gradient,
        mode,
    };
    let out = ctx.record(&mut enc, &problem, &args.opts, ws).unwrap_or_else(|e| panic!("xent_burn: {e}"));
    if matches!(pass, Pass::Forward | Pass::ForwardGrad) {
        // Binary targets under `none`: one loss per element.
        let per_row = if binary { (n * v) as u64 * 4 } else { n as u64 * 4 };
        let (loss_src, loss_bytes) = if args.reduced() { (&out.loss, 4) } else { (&out.row_loss, per_row) };
        copy_into(&mut enc, loss_src, &r_out[0], loss_bytes);
        if !binary {
            copy_into(&mut enc, &out.lse, &r_out[1], n as u64 * 4);
        }
    }
    if let (Some(b), Some(g)) = (&grad_private, grad_out) {
        assert!(
            grad_bytes.is_multiple_of(4),
            "xent_burn: a half gradient of an odd number of elements sharing burn's buffer with its inputs"
        );
        copy_into(&mut enc, b, &r_out[g], grad_bytes);
    }
    ctx.queue().submit([enc.finish()]);
    // cubecl's handler panics on an uncaught error, later and elsewhere: ours are caught here.
    for error in [scope.1.pop(), scope.0.pop()] {
        if let Some(e) = burn::cubecl::future::block_on(error) {
            panic!("xent_burn: wgpu refused the loss's commands: {e}");
        }
    }
    drop(guard);
    drop((r_logits, r_labels, r_out, r_lse, r_up));
    outputs
}

fn triple(mut v: Vec<CubeTensor>) -> (CubeTensor, CubeTensor, CubeTensor) {
    let grad = v.pop().unwrap_or_else(|| unreachable!());
    let (loss, lse) = pair(v);
    (loss, lse, grad)
}

fn pair(mut v: Vec<CubeTensor>) -> (CubeTensor, CubeTensor) {
    let lse = v.pop().unwrap_or_else(|| unreachable!());
    let loss = v.pop().unwrap_or_else(|| unreachable!());
    (loss, lse)
}

fn single(mut v: Vec<CubeTensor>) -> CubeTensor {
    v.pop().unwrap_or_else(|| unreachable!())
}

impl XentOps for CubeBackend {
    fn xent_forward(logits: CubeTensor, targets: CubeTensor, args: XentArgs) -> (CubeTensor, CubeTensor) {
        pair(run(logits, CubeLabels::Classes(targets), Pass::Forward, &args))
    }

    fn xent_backward(
        logits: CubeTensor,
        targets: CubeTensor,
        lse: CubeTensor,
        upstream: CubeTensor,
        args: XentArgs,
    ) -> CubeTensor {
        single(run(
            logits,
            CubeLabels::Classes(targets),
            Pass::Backward { lse: Some(&lse), upstream: &upstream },
            &args,
        ))
    }

    fn xent_forward_probs(
        logits: CubeTensor,
        targets: CubeTensor,
        args: XentArgs,
    ) -> (CubeTensor, CubeTensor) {
        pair(run(logits, CubeLabels::Probabilities(targets), Pass::Forward, &args))
    }

    fn xent_backward_probs(
        logits: CubeTensor,
        targets: CubeTensor,
        lse: CubeTensor,
        upstream: CubeTensor,
        args: XentArgs,
    ) -> CubeTensor {
        let labels = CubeLabels::Probabilities(targets);
        single(run(logits, labels, Pass::Backward { lse: Some(&lse), upstream: &upstream }, &args))
    }

    fn xent_forward_grad(
        logits: CubeTensor,
        targets: CubeTensor,
        args: XentArgs,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        triple(run(logits, CubeLabels::Classes(targets), Pass::ForwardGrad, &args))
    }

    fn xent_forward_grad_probs(
        logits: CubeTensor,
        targets: CubeTensor,
        args: XentArgs,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        triple(run(logits, CubeLabels::Probabilities(targets), Pass::ForwardGrad, &args))
    }

    fn xent_forward_binary(logits: CubeTensor, targets: CubeTensor, args: XentArgs) -> CubeTensor {
        single(run(logits, CubeLabels::Binary(targets), Pass::Forward, &args))
    }

    fn xent_backward_binary(
        logits: CubeTensor,
        targets: CubeTensor,
        upstream: CubeTensor,
        args: XentArgs,
    ) -> CubeTensor {
        let labels = CubeLabels::Binary(targets);
        single(run(logits, labels, Pass::Backward { lse: None, upstream: &upstream }, &args))
    }

    fn xent_linear_forward(
        hidden: CubeTensor,
        weight: CubeTensor,
        bias: CubeTensor,
        targets: CubeTensor,
        denominator: CubeTensor,
        args: LinearArgs,
    ) -> (CubeTensor, CubeTensor) {
        linear::forward::<Self>(hidden, weight, bias, targets, denominator, &args)
    }

    fn xent_linear_forward_grad(
        hidden: CubeTensor,
        weight: CubeTensor,
        bias: CubeTensor,
        targets: CubeTensor,
        args: LinearArgs,
    ) -> (CubeTensor, CubeTensor, CubeTensor, CubeTensor, CubeTensor) {
        let [loss, lse, dh, dw, db] = linear::forward_grad::<Self>(hidden, weight, bias, targets, &args);
        (loss, lse, dh, dw, db)
    }

    fn xent_linear_backward(
        hidden: CubeTensor,
        weight: CubeTensor,
        bias: CubeTensor,
        targets: CubeTensor,
        denominator: CubeTensor,
        lse: CubeTensor,
        upstream: CubeTensor,
        args: LinearArgs,
    ) -> (CubeTensor, CubeTensor, CubeTensor) {
        linear::backward::<Self>(hidden, weight, bias, targets, denominator, lse, upstream, &args)
    }
}

/// The two kinds of targets, for the autodiff side: their primitive on the inner backend
/// and the inner backend's forward, without and with the gradient.
trait Targets<B: XentOps>: Send + std::fmt::Debug + 'static {
    type Prim: Clone + Send + std::fmt::Debug + 'static;
    fn forward(logits: FloatTensor<B>, t: Self::Prim, args: XentArgs) -> (FloatTensor<B>, FloatTensor<B>);
    fn forward_grad(logits: FloatTensor<B>, t: Self::Prim, args: XentArgs) -> [FloatTensor<B>; 3];
    fn backward(
        logits: FloatTensor<B>,
        t: Self::Prim,
        lse: FloatTensor<B>,
        up: FloatTensor<B>,
        args: XentArgs,
    ) -> FloatTensor<B>;
}

#[derive(Debug)]
struct ClassIndices;

impl<B: XentOps> Targets<B> for ClassIndices {
    type Prim = IntTensor<B>;
    fn forward(logits: FloatTensor<B>, t: Self::Prim, args: XentArgs) -> (FloatTensor<B>, FloatTensor<B>) {
        B::xent_forward(logits, t, args)
    }
    fn forward_grad(logits: FloatTensor<B>, t: Self::Prim, args: XentArgs) -> [FloatTensor<B>; 3] {
        let (loss, lse, grad) = B::xent_forward_grad(logits, t, args);
        [loss, lse, grad]
    }
    fn backward(
        logits: FloatTensor<B>,
        t: Self::Prim,
        lse: FloatTensor<B>,
        up: FloatTensor<B>,
        args: XentArgs,
    ) -> FloatTensor<B> {
        B::xent_backward(logits, t, lse, up, args)
    }
}

#[derive(Debug)]
struct Probabilities;

impl<B: XentOps> Targets<B> for Probabilities {
    type Prim = FloatTensor<B>;
    fn forward(logits: FloatTensor<B>, t: Self::Prim, args: XentArgs) -> (FloatTensor<B>, FloatTensor<B>) {
        B::xent_forward_probs(logits, t, args)
    }
    fn forward_grad(logits: FloatTensor<B>, t: Self::Prim, args: XentArgs) -> [FloatTensor<B>; 3] {
        let (loss, lse, grad) = B::xent_forward_grad_probs(logits, t, args);
        [loss, lse, grad]
    }
    fn backward(
        logits: FloatTensor<B>,
        t: Self::Prim,
        lse: FloatTensor<B>,
        up: FloatTensor<B>,
        args: XentArgs,
    ) -> FloatTensor<B> {
        B::xent_backward_probs(logits, t, lse, up, args)
    }
}

/// The loss's backward. Under `mean`/`sum` the forward computed ∂loss/∂logits in its pass
/// (upstream 1): with burn's upstream exactly 1 (`loss.backward()` on the loss itself, read
/// back: one float) that is the gradient. Otherwise xent's saved-LSE kernel recomputes it
/// with the upstream in the kernel (a scalar, or one per row for `none`), which costs
/// less than burn's broadcast multiply of [N, V]. Registered for the logits (none for the
/// targets).
#[derive(Debug)]
struct LossBackward<K>(std::marker::PhantomData<K>);

impl<B: XentOps, K: Targets<B>> Backward<B, 1> for LossBackward<K> {
    /// The logits, targets, LSE, the forward's gradient (`mean`/`sum`) and the options.
    type State = (FloatTensor<B>, K::Prim, FloatTensor<B>, Option<FloatTensor<B>>, XentArgs);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [logits_node] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let (logits, targets, lse, formed, args) = ops.state;
        if let Some(node) = logits_node {
            let grad = match formed {
                Some(grad) if scalar::<B>(&upstream) == 1.0 => grad,
                _ => K::backward(logits, targets, lse, upstream, args),
            };
            grads.register::<B>(node.id, grad);
        }
    }
}

/// The value of a one-element tensor (read back: a wait for the work before it).
pub(crate) fn scalar<B: Backend>(t: &FloatTensor<B>) -> f32 {
    let data = burn::tensor::read_sync(B::float_into_data(t.clone()))
        .unwrap_or_else(|e| panic!("xent_burn: reading the upstream gradient: {e:?}"));
    match data.convert::<f32>().try_to_vec::<f32>() {
        Ok(v) if v.len() == 1 => v[0],
        other => panic!("xent_burn: an upstream gradient of one value, not {other:?}"),
    }
}

/// Binary cross-entropy's backward: recomputed from the logits and targets, scaled by the
/// upstream gradient, registered for the logits.
#[derive(Debug)]
struct BinaryBackward;

impl<B: XentOps> Backward<B, 1> for BinaryBackward {
    type State = (FloatTensor<B>, FloatTensor<B>, XentArgs);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [logits_node] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let (logits, targets, args) = ops.state;
        if let Some(node) = logits_node {
            grads.register::<B>(node.id, B::xent_backward_binary(logits, targets, upstream, args));
        }
    }
}

/// The linear head's backward, registered for whichever of h, W and b are tracked. Under
/// `mean`/`sum` the forward formed (dh, dW, db) in its pass: with burn's upstream exactly
/// 1 they are the answer. Otherwise (another upstream, `none`) they are recomputed block
/// by block from the saved LSE with the upstream in xent's kernel.
#[derive(Debug)]
struct LinearBackward;

/// The saved state of [`LinearBackward`]: h, W and b (handles: the caller holds them
/// anyway), the targets, the denominator, the LSE, the options, and the forward's
/// gradients when it formed them.
type LinearState<B> = (
    [FloatTensor<B>; 3],
    IntTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    LinearArgs,
    Option<[FloatTensor<B>; 3]>,
);

impl<B: XentOps> Backward<B, 3> for LinearBackward {
    type State = LinearState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let upstream = grads.consume::<B>(&ops.node);
        let ([h, w, b], targets, denominator, lse, args, formed) = ops.state;
        let [dh, dw, db] = match formed {
            Some(formed) if scalar::<B>(&upstream) == 1.0 => formed,
            _ => {
                let (dh, dw, db) =
                    B::xent_linear_backward(h, w, b, targets, denominator, lse, upstream, args);
                [dh, dw, db]
            }
        };
        for (node, grad) in ops.parents.into_iter().zip([dh, dw, db]) {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// A forward's (loss, LSE) on the autodiff backend.
type LossAndLse<B, C> = (FloatTensor<Autodiff<B, C>>, FloatTensor<Autodiff<B, C>>);

/// The tracked forward: the inner backend's loss, with the gradient from the same pass
/// (Liger's fused forward: one read of the logits instead of a second in the backward)
/// saved for the backward beside the logits, targets and LSE; the LSE comes back
/// untracked.
fn tracked<B: XentOps, C: CheckpointStrategy, K: Targets<B>>(
    logits: FloatTensor<Autodiff<B, C>>,
    targets: K::Prim,
    args: XentArgs,
) -> LossAndLse<B, C> {
    let untracked = <Autodiff<B, C> as AutodiffBackend>::from_inner;
    match LossBackward::<K>(std::marker::PhantomData).prepare::<C>([logits.node()]).compute_bound().stateful()
    {
        // Under `none` the upstream is one value per row, known only in the backward: the
        // forward's gradient would be thrown away, so it is not formed.
        OpsKind::Tracked(prep) if !args.reduced() => {
            let x = logits.into_primitive();
            let (loss, lse) = K::forward(x.clone(), targets.clone(), args.clone());
            (prep.finish((x, targets, lse.clone(), None, args), loss), untracked(lse))
        }
        OpsKind::Tracked(prep) => {
            let x = logits.into_primitive();
            let [loss, lse, grad] = K::forward_grad(x.clone(), targets.clone(), args.clone());
            (prep.finish((x, targets, lse.clone(), Some(grad), args), loss), untracked(lse))
        }
        OpsKind::UnTracked(prep) => {
            let (loss, lse) = K::forward(logits.into_primitive(), targets, args);
            (prep.finish(loss), untracked(lse))
        }
    }
}

// The backward ops are not differentiable again: their gradient is a constant of the graph.
impl<B: XentOps, C: CheckpointStrategy> XentOps for Autodiff<B, C> {
    fn xent_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tracked::<B, C, ClassIndices>(logits, targets, args)
    }

    fn xent_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentArgs,
    ) -> FloatTensor<Self> {
        let (x, l, u) = (logits.into_primitive(), lse.into_primitive(), upstream.into_primitive());
        Self::from_inner(B::xent_backward(x, targets, l, u, args))
    }

    fn xent_forward_probs(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tracked::<B, C, Probabilities>(logits, targets.into_primitive(), args)
    }

    fn xent_forward_grad(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, lse, grad) = B::xent_forward_grad(logits.into_primitive(), targets, args);
        (Self::from_inner(loss), Self::from_inner(lse), Self::from_inner(grad))
    }

    fn xent_forward_grad_probs(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        args: XentArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (loss, lse, grad) =
            B::xent_forward_grad_probs(logits.into_primitive(), targets.into_primitive(), args);
        (Self::from_inner(loss), Self::from_inner(lse), Self::from_inner(grad))
    }

    fn xent_backward_probs(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentArgs,
    ) -> FloatTensor<Self> {
        let (x, t) = (logits.into_primitive(), targets.into_primitive());
        let (l, u) = (lse.into_primitive(), upstream.into_primitive());
        Self::from_inner(B::xent_backward_probs(x, t, l, u, args))
    }

    fn xent_forward_binary(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        args: XentArgs,
    ) -> FloatTensor<Self> {
        let targets = targets.into_primitive();
        match BinaryBackward.prepare::<C>([logits.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let x = logits.primitive().clone();
                let loss = B::xent_forward_binary(x.clone(), targets.clone(), args.clone());
                prep.finish((x, targets, args), loss)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::xent_forward_binary(logits.into_primitive(), targets, args))
            }
        }
    }

    fn xent_backward_binary(
        logits: FloatTensor<Self>,
        targets: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: XentArgs,
    ) -> FloatTensor<Self> {
        let (x, t, u) = (logits.into_primitive(), targets.into_primitive(), upstream.into_primitive());
        Self::from_inner(B::xent_backward_binary(x, t, u, args))
    }

    fn xent_linear_forward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        denominator: FloatTensor<Self>,
        args: LinearArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let untracked = <Autodiff<B, C> as AutodiffBackend>::from_inner;
        let denominator = denominator.into_primitive();
        let nodes = [hidden.node(), weight.node(), bias.node()];
        match LinearBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let inputs =
                    [hidden.primitive().clone(), weight.primitive().clone(), bias.primitive().clone()];
                let [h, w, b] = inputs.clone();
                // Under `mean`/`sum` the gradients come from the forward's pass (three
                // products a block, not four); that needs the denominator's value (one
                // float read back). A denominator of 0 or NaN (every row ignored) keeps the
                // recomputing backward and its NaN.
                let value = (args.opts.get_reduction() != Reduction::None)
                    .then(|| f64::from(scalar::<B>(&denominator)))
                    .filter(|d| d.is_finite() && *d > 0.0);
                let (loss, lse, formed) = match value {
                    Some(d) => {
                        let fused = LinearArgs { denominator_value: Some(d), ..args.clone() };
                        let (loss, lse, dh, dw, db) =
                            B::xent_linear_forward_grad(h, w, b, targets.clone(), fused);
                        (loss, lse, Some([dh, dw, db]))
                    }
                    None => {
                        let (loss, lse) = B::xent_linear_forward(
                            h,
                            w,
                            b,
                            targets.clone(),
                            denominator.clone(),
                            args.clone(),
                        );
                        (loss, lse, None)
                    }
                };
                let state = (inputs, targets, denominator, lse.clone(), args, formed);
                (prep.finish(state, loss), untracked(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (h, w, b) = (hidden.into_primitive(), weight.into_primitive(), bias.into_primitive());
                let (loss, lse) = B::xent_linear_forward(h, w, b, targets, denominator, args);
                (prep.finish(loss), untracked(lse))
            }
        }
    }

    fn xent_linear_forward_grad(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: LinearArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (h, w, b) = (hidden.into_primitive(), weight.into_primitive(), bias.into_primitive());
        let (loss, lse, dh, dw, db) = B::xent_linear_forward_grad(h, w, b, targets, args);
        let inner = Self::from_inner;
        (inner(loss), inner(lse), inner(dh), inner(dw), inner(db))
    }

    fn xent_linear_backward(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        targets: IntTensor<Self>,
        denominator: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        upstream: FloatTensor<Self>,
        args: LinearArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (h, w, b) = (hidden.into_primitive(), weight.into_primitive(), bias.into_primitive());
        let (d, l, u) = (denominator.into_primitive(), lse.into_primitive(), upstream.into_primitive());
        let (dh, dw, db) = B::xent_linear_backward(h, w, b, targets, d, l, u, args);
        (Self::from_inner(dh), Self::from_inner(dw), Self::from_inner(db))
    }
}
