//! The LM head without its logits: `h Wᵀ + b` a block of rows at a time through burn's
//! matrix product, each block's cross-entropy through xent's fused kernel, the block's
//! logits dropped before the next. Each block's gradient G forms `dh = G W`,
//! `dW += Gᵀ h`, `db += Σ G` block after block (f32 sums, a fixed order). Under
//! `mean`/`sum` the tracked forward takes G from the same pass as the loss (Liger's
//! fused forward: three matrix products a block); otherwise the backward recomputes each
//! block's logits and takes G from xent's saved-LSE kernel (four). No [N, V] tensor
//! exists: the largest is one block of logits and its G.
//!
//! Generic over the inner backend, so that `CubeBackend`, burn's fusion and autodiff share
//! it; the cross-entropy of a block goes through [`XentOps`].

use std::sync::atomic::{AtomicU64, Ordering};

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Slice, TensorMetadata};
use burn::tensor::{DType, FloatDType, Shape};
use xent::{LossOptions, Reduction};

use crate::TargetKind;
use crate::kernels::{XentArgs, XentOps, scalar};

/// How often the process's head calls took each way to their gradients (for tests that
/// prove which way ran; burn's fusion runs the ops on its device thread, so these are
/// process-wide).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeadPasses {
    /// Forwards that formed dh, dW and db in their pass.
    pub fused_forwards: u64,
    /// Backwards that recomputed the logits.
    pub recomputing_backwards: u64,
}

static FUSED_FORWARDS: AtomicU64 = AtomicU64::new(0);
static RECOMPUTING_BACKWARDS: AtomicU64 = AtomicU64::new(0);

/// The process's [`HeadPasses`] so far.
#[doc(hidden)]
pub fn head_passes() -> HeadPasses {
    HeadPasses {
        fused_forwards: FUSED_FORWARDS.load(Ordering::Relaxed),
        recomputing_backwards: RECOMPUTING_BACKWARDS.load(Ordering::Relaxed),
    }
}

/// The options of a linear-head call, carried to the device.
#[derive(Clone, Debug)]
pub struct LinearArgs {
    /// The loss options, as the caller gave them.
    pub opts: LossOptions,
    /// Rows per block: one block's logits (and their gradient) are the head's largest
    /// tensors.
    pub block_rows: usize,
    /// The z-loss coefficient of a block's call: the caller's, or under `mean` with class
    /// weights the caller's times Σ w_y / counted rows (so that one denominator serves
    /// both parts, see [`crate::try_linear_cross_entropy`]).
    pub block_z_loss: f64,
    /// The `mean` denominator's value (1 for `sum`), read back by a tracked forward that
    /// forms the gradients in its pass: its blocks take `mean` with this as `n_items`,
    /// so that each block's G carries the whole batch's scale. `None` otherwise.
    pub denominator_value: Option<f64>,
}

impl LinearArgs {
    fn reduced(&self) -> bool {
        self.opts.get_reduction() != Reduction::None
    }

    /// A block's options: the sum (or `none`) of its rows (where `n_items` has no say);
    /// the mean's denominator divides afterwards.
    fn block(&self) -> XentArgs {
        let reduction = if self.reduced() { Reduction::Sum } else { Reduction::None };
        XentArgs::new(self.opts.clone().reduction(reduction).z_loss(self.block_z_loss), TargetKind::Classes)
    }

    /// A block's options when the forward forms the gradients: `mean` over the whole
    /// batch's denominator (as `n_items`), or `sum`.
    fn grad_block(&self, denominator: f64) -> XentArgs {
        let opts = match self.opts.get_reduction() {
            Reduction::Mean => self.opts.clone().n_items(denominator),
            _ => self.opts.clone(),
        };
        XentArgs::new(opts.z_loss(self.block_z_loss), TargetKind::Classes)
    }

    fn blocks(&self, rows: usize) -> impl Iterator<Item = std::ops::Range<usize>> + use<> {
        let step = self.block_rows.max(1);
        (0..rows).step_by(step).map(move |r0| r0..(r0 + step).min(rows))
    }
}

fn dims<B: XentOps>(t: &FloatTensor<B>) -> Vec<usize> {
    TensorMetadata::shape(t).to_vec()
}

fn rows<B: XentOps>(t: FloatTensor<B>, r: &std::ops::Range<usize>) -> FloatTensor<B> {
    B::float_slice(t, &[Slice::from(r.clone()), Slice::from(..)])
}

/// One block's logits `h[r] Wᵀ + b` [rows, V], in the inputs' type.
fn logits<B: XentOps>(
    h: &FloatTensor<B>,
    wt: &FloatTensor<B>,
    bias_row: &FloatTensor<B>,
    r: &std::ops::Range<usize>,
) -> FloatTensor<B> {
    B::float_add(B::float_matmul(rows::<B>(h.clone(), r), wt.clone()), bias_row.clone())
}

/// The loss (shape [1] for `mean`/`sum`, [N] for `none`) and each row's LSE [N].
pub(crate) fn forward<B: XentOps>(
    h: FloatTensor<B>,
    w: FloatTensor<B>,
    b: FloatTensor<B>,
    targets: IntTensor<B>,
    denominator: FloatTensor<B>,
    args: &LinearArgs,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let n = dims::<B>(&h)[0];
    let v = dims::<B>(&w)[0];
    let wt = B::float_transpose(w);
    let bias_row = B::float_reshape(b, Shape::new([1, v]));
    let block = args.block();
    let (mut losses, mut lses) = (Vec::new(), Vec::new());
    for r in args.blocks(n) {
        let t = B::int_slice(targets.clone(), &[Slice::from(r.clone())]);
        let (loss, lse) = B::xent_forward(logits::<B>(&h, &wt, &bias_row, &r), t, block.clone());
        losses.push(loss);
        lses.push(lse);
    }
    let lse = B::float_cat(lses, 0);
    let loss = if args.reduced() {
        let total = losses.into_iter().reduce(B::float_add).unwrap_or_else(|| unreachable!("rows > 0"));
        B::float_div(total, denominator)
    } else {
        B::float_cat(losses, 0)
    };
    (loss, lse)
}

/// (dh, dW, db) of the loss times `upstream` ([1], or [N] for `none`), each in its
/// input's type (dW and db summed in f32 over the blocks, rounded once).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<B: XentOps>(
    h: FloatTensor<B>,
    w: FloatTensor<B>,
    b: FloatTensor<B>,
    targets: IntTensor<B>,
    denominator: FloatTensor<B>,
    lse: FloatTensor<B>,
    upstream: FloatTensor<B>,
    args: &LinearArgs,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    RECOMPUTING_BACKWARDS.fetch_add(1, Ordering::Relaxed);
    let (n, d) = (dims::<B>(&h)[0], dims::<B>(&h)[1]);
    let v = dims::<B>(&w)[0];
    let dtype = h.dtype();
    let wt = B::float_transpose(w.clone());
    let bias_row = B::float_reshape(b.clone(), Shape::new([1, v]));
    let mut block = args.block();
    // Under `mean`/`sum` every block's upstream is the caller's over the denominator,
    // read once here rather than by each block's kernel (a wait for the device each).
    let scale = args.reduced().then(|| B::float_div(f32_of::<B>(upstream.clone()), denominator));
    block.upstream = scale.as_ref().map(scalar::<B>);
    let mut sums = GradSums::<B>::default();
    for r in args.blocks(n) {
        let t = B::int_slice(targets.clone(), &[Slice::from(r.clone())]);
        let up = match &scale {
            Some(s) => s.clone(),
            None => B::float_slice(upstream.clone(), &[Slice::from(r.clone())]),
        };
        let l = B::float_slice(lse.clone(), &[Slice::from(r.clone())]);
        let g = B::xent_backward(logits::<B>(&h, &wt, &bias_row, &r), t, l, up, block.clone());
        sums.add(g, &h, &w, &r);
    }
    let [dh, dw, db] = sums.finish(dtype, [n, d], v);
    (dh, dw, db)
}

/// The forward of [`forward`] with the gradients of its loss (upstream 1) formed in the
/// same pass: (loss, LSE, dh, dW, db). Under `mean`/`sum` only, with
/// [`LinearArgs::denominator_value`] set.
pub(crate) fn forward_grad<B: XentOps>(
    h: FloatTensor<B>,
    w: FloatTensor<B>,
    b: FloatTensor<B>,
    targets: IntTensor<B>,
    args: &LinearArgs,
) -> [FloatTensor<B>; 5] {
    assert!(args.reduced(), "xent_burn: the head's fused forward takes `mean` or `sum`");
    let denominator = args
        .denominator_value
        .unwrap_or_else(|| panic!("xent_burn: the head's fused forward wants its denominator"));
    FUSED_FORWARDS.fetch_add(1, Ordering::Relaxed);
    let (n, d) = (dims::<B>(&h)[0], dims::<B>(&h)[1]);
    let v = dims::<B>(&w)[0];
    let dtype = h.dtype();
    let wt = B::float_transpose(w.clone());
    let bias_row = B::float_reshape(b, Shape::new([1, v]));
    let block = args.grad_block(denominator);
    let (mut loss, mut lses, mut sums) = (None::<FloatTensor<B>>, Vec::new(), GradSums::<B>::default());
    for r in args.blocks(n) {
        let t = B::int_slice(targets.clone(), &[Slice::from(r.clone())]);
        let (l, lse, g) = B::xent_forward_grad(logits::<B>(&h, &wt, &bias_row, &r), t, block.clone());
        loss = Some(match loss {
            Some(acc) => B::float_add(acc, l),
            None => l,
        });
        lses.push(lse);
        sums.add(g, &h, &w, &r);
    }
    let [dh, dw, db] = sums.finish(dtype, [n, d], v);
    [loss.unwrap_or_else(|| unreachable!("rows > 0")), B::float_cat(lses, 0), dh, dw, db]
}

/// dh block by block, dW and db summed over the blocks in f32 (a fixed order).
struct GradSums<B: XentOps> {
    dh: Vec<FloatTensor<B>>,
    dw: Option<FloatTensor<B>>,
    db: Option<FloatTensor<B>>,
}

impl<B: XentOps> Default for GradSums<B> {
    fn default() -> Self {
        Self { dh: Vec::new(), dw: None, db: None }
    }
}

fn f32_of<B: XentOps>(t: FloatTensor<B>) -> FloatTensor<B> {
    if t.dtype() == DType::F32 { t } else { B::float_cast(t, FloatDType::F32) }
}

impl<B: XentOps> GradSums<B> {
    /// The products of one block's gradient `g` [rows, V] (rows `r` of h).
    fn add(&mut self, g: FloatTensor<B>, h: &FloatTensor<B>, w: &FloatTensor<B>, r: &std::ops::Range<usize>) {
        self.dh.push(B::float_matmul(g.clone(), w.clone()));
        let g32 = f32_of::<B>(g);
        let gw = B::float_matmul(B::float_transpose(g32.clone()), f32_of::<B>(rows::<B>(h.clone(), r)));
        let gb = B::float_sum_dim(g32, 0);
        let sum = |acc: Option<FloatTensor<B>>, x| match acc {
            Some(a) => B::float_add(a, x),
            None => x,
        };
        self.dw = Some(sum(self.dw.take(), gw));
        self.db = Some(sum(self.db.take(), gb));
    }

    /// (dh [N, D], dW [V, D], db [V]) in the inputs' type `dtype` (dW and db rounded once).
    fn finish(self, dtype: DType, [n, d]: [usize; 2], v: usize) -> [FloatTensor<B>; 3] {
        let back = |t: FloatTensor<B>| if dtype == DType::F32 { t } else { B::float_cast(t, dtype.into()) };
        let dw = self.dw.unwrap_or_else(|| unreachable!("rows > 0"));
        let db = B::float_reshape(self.db.unwrap_or_else(|| unreachable!("rows > 0")), Shape::new([v]));
        let dh = B::float_cat(self.dh, 0);
        debug_assert_eq!(dims::<B>(&dh), [n, d]);
        [dh, back(dw), back(db)]
    }
}
