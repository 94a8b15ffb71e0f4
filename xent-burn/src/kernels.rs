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
//! - `Autodiff<B>`: the forward through `B`, with a backward that runs xent's saved-LSE
//!   backward kernel through `B` and registers the logits' gradient.
//!
//! The loss of `mean`/`sum` is shape [1]; its backward computes ∂loss/∂logits (upstream 1)
//! and multiplies by burn's upstream gradient on the device (one elementwise pass; no
//! read back). Under `none` the upstream [N] goes to the kernel as one value per row.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::FloatTensorOps;
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
use crate::registry::{Engine, Private, engine};

/// The options of a call, carried to the device (and by the fusion stream's closure).
#[derive(Clone, Debug)]
pub struct XentArgs {
    /// The loss options.
    pub opts: LossOptions,
    /// The kind of the targets.
    pub kind: TargetKind,
}

impl XentArgs {
    /// Options for targets of `kind`.
    pub fn new(opts: LossOptions, kind: TargetKind) -> Self {
        Self { opts, kind }
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

/// xent's loss on a backend: the forward (loss, LSE) and the backward from the saved LSE
/// (the gradient over the logits, in their type, times the upstream gradient), for class
/// indices and for probability targets.
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
}

impl CubeLabels {
    fn tensor(&self) -> &CubeTensor {
        match self {
            CubeLabels::Classes(t) | CubeLabels::Probabilities(t) => t,
        }
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
    Backward { lse: &'a CubeTensor, upstream: &'a CubeTensor },
}

/// Records xent over burn's buffers and submits it on burn's queue: the forward's
/// (loss, LSE), or the backward's gradient.
fn run(logits: CubeTensor, labels: CubeLabels, pass: Pass<'_>, args: &XentArgs) -> Vec<CubeTensor> {
    let engine = engine_of(&logits);
    let ctx = &engine.ctx;
    let device = ctx.device();
    // Row major, untiled (a matmul's output may be storage-tiled).
    let logits = into_contiguous(logits);
    let labels = match labels {
        CubeLabels::Classes(t) => CubeLabels::Classes(into_contiguous(t)),
        CubeLabels::Probabilities(t) => CubeLabels::Probabilities(into_contiguous(t)),
    };
    let (n, v) = rows_classes(&logits);
    let dtype = xent_dtype(logits.dtype);
    let outputs: Vec<CubeTensor> = match pass {
        Pass::Forward => vec![
            empty_like(&logits, Shape::new([if args.reduced() { 1 } else { n }]), DType::F32),
            empty_like(&logits, Shape::new([n]), DType::F32),
        ],
        Pass::Backward { .. } => vec![empty_like(&logits, Shape::new([n, v]), logits.dtype)],
    };
    let (lse, upstream) = match pass {
        Pass::Backward { lse, upstream } => {
            (Some(into_contiguous(lse.clone())), Some(into_contiguous(upstream.clone())))
        }
        Pass::Forward => (None, None),
    };
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
        CubeLabels::Probabilities(_) => None,
    };
    let lse_own = r_lse.as_ref().map(|r| own(&mut enc, Private::LSE, r, n as u64 * 4));
    let up_own = match (&r_up, args.reduced()) {
        (Some(r), false) => Some(own(&mut enc, Private::UPSTREAM, r, n as u64 * 4)),
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
    };
    // The probability kernel reads its logits and targets read-only: a gradient in a
    // buffer that holds either goes through a buffer of our own.
    let grad_bytes = (n * v * logits.dtype.size()) as u64;
    let grad_private = match (&pass, &labels) {
        (Pass::Backward { .. }, CubeLabels::Probabilities(_)) => {
            let out = &r_out[0].resource().buffer;
            (*out == r_logits.resource().buffer || *out == r_labels.resource().buffer)
                .then(|| private.buffer(device, Private::GRAD, grad_bytes.next_multiple_of(4)))
        }
        _ => None,
    };
    let (gradient, mode) = match &lse_own {
        Some(l) => {
            let into = match &grad_private {
                Some(b) => DeviceSlice::from(b),
                None => slice(&r_out[0]),
            };
            let gradient =
                if dtype == Dtype::F32 { DeviceGradient::Into(into) } else { DeviceGradient::IntoHalf(into) };
            let upstream = match &up_own {
                Some(u) => DeviceUpstream::PerRow(DeviceSlice::from(u)),
                None => DeviceUpstream::Scalar(1.0),
            };
            (gradient, DeviceMode::Backward { lse: Some(DeviceSlice::from(l)), upstream })
        }
        None => (DeviceGradient::None, DeviceMode::Fused),
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
    match pass {
        Pass::Forward => {
            let (loss_src, loss_bytes) =
                if args.reduced() { (&out.loss, 4) } else { (&out.row_loss, n as u64 * 4) };
            copy_into(&mut enc, loss_src, &r_out[0], loss_bytes);
            copy_into(&mut enc, &out.lse, &r_out[1], n as u64 * 4);
        }
        Pass::Backward { .. } => {
            if let Some(b) = &grad_private {
                assert!(
                    grad_bytes.is_multiple_of(4),
                    "xent_burn: a half gradient of an odd number of elements sharing burn's buffer with its inputs"
                );
                copy_into(&mut enc, b, &r_out[0], grad_bytes);
            }
        }
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
    match (pass, args.reduced()) {
        // ∂loss/∂logits times burn's upstream gradient (shape [1]), on the device.
        (Pass::Backward { upstream, .. }, true) => {
            let grad = outputs.into_iter().next().unwrap_or_else(|| unreachable!());
            let up = CubeBackend::float_reshape(upstream.clone(), Shape::new([1, 1]));
            let up = if grad.dtype == up.dtype { up } else { CubeBackend::float_cast(up, grad.dtype.into()) };
            vec![CubeBackend::float_mul(grad, up)]
        }
        _ => outputs,
    }
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
            Pass::Backward { lse: &lse, upstream: &upstream },
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
        single(run(logits, labels, Pass::Backward { lse: &lse, upstream: &upstream }, &args))
    }
}

/// The two kinds of targets, for the autodiff side: their primitive on the inner backend
/// and the inner backend's forward and backward.
trait Targets<B: XentOps>: Send + std::fmt::Debug + 'static {
    type Prim: Clone + Send + std::fmt::Debug + 'static;
    fn forward(logits: FloatTensor<B>, t: Self::Prim, args: XentArgs) -> (FloatTensor<B>, FloatTensor<B>);
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

/// The loss's backward: xent's saved-LSE kernel through the inner backend, scaled by the
/// upstream gradient burn hands over, registered for the logits (none for the targets).
#[derive(Debug)]
struct LossBackward<K>(std::marker::PhantomData<K>);

impl<B: XentOps, K: Targets<B>> Backward<B, 1> for LossBackward<K> {
    type State = (FloatTensor<B>, K::Prim, FloatTensor<B>, XentArgs);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [logits_node] = ops.parents;
        let upstream = grads.consume::<B>(&ops.node);
        let (logits, targets, lse, args) = ops.state;
        if let Some(node) = logits_node {
            grads.register::<B>(node.id, K::backward(logits, targets, lse, upstream, args));
        }
    }
}

/// A forward's (loss, LSE) on the autodiff backend.
type LossAndLse<B, C> = (FloatTensor<Autodiff<B, C>>, FloatTensor<Autodiff<B, C>>);

/// The tracked forward: the inner backend's loss, with the LSE (untracked) saved for the
/// backward beside the logits and targets.
fn tracked<B: XentOps, C: CheckpointStrategy, K: Targets<B>>(
    logits: FloatTensor<Autodiff<B, C>>,
    targets: K::Prim,
    args: XentArgs,
) -> LossAndLse<B, C> {
    let untracked = <Autodiff<B, C> as AutodiffBackend>::from_inner;
    match LossBackward::<K>(std::marker::PhantomData).prepare::<C>([logits.node()]).compute_bound().stateful()
    {
        OpsKind::Tracked(prep) => {
            let x = logits.primitive().clone();
            let (loss, lse) = K::forward(x.clone(), targets.clone(), args.clone());
            (prep.finish((x, targets, lse.clone(), args), loss), untracked(lse))
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
}
