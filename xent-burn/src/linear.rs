//! The LM head without its logits: `h Wᵀ + b` a block of rows at a time through burn's
//! matrix product, each block's cross-entropy through xent's fused kernel, the block's
//! logits dropped before the next. The backward recomputes each block's logits, takes
//! its gradient G from xent's saved-LSE kernel, and forms `dh = G W`, `dW += Gᵀ h`,
//! `db += Σ G` block after block (f32 sums, a fixed order). No [N, V] tensor exists:
//! the largest is one block of logits and its G.
//!
//! Generic over the inner backend, so that `CubeBackend`, burn's fusion and autodiff share
//! it; the cross-entropy of a block goes through [`XentOps`].

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Slice, TensorMetadata};
use burn::tensor::{DType, FloatDType, Shape};
use xent::{LossOptions, Reduction};

use crate::TargetKind;
use crate::kernels::{XentArgs, XentOps, scalar};

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
    let (n, d) = (dims::<B>(&h)[0], dims::<B>(&h)[1]);
    let v = dims::<B>(&w)[0];
    let dtype = h.dtype();
    let f32_of =
        |t: FloatTensor<B>| if t.dtype() == DType::F32 { t } else { B::float_cast(t, FloatDType::F32) };
    let wt = B::float_transpose(w.clone());
    let bias_row = B::float_reshape(b.clone(), Shape::new([1, v]));
    let mut block = args.block();
    // Under `mean`/`sum` every block's upstream is the caller's over the denominator,
    // read once here rather than by each block's kernel (a wait for the device each).
    let scale = args.reduced().then(|| B::float_div(f32_of(upstream.clone()), denominator));
    block.upstream = scale.as_ref().map(scalar::<B>);
    let (mut dh, mut dw, mut db) = (Vec::new(), None::<FloatTensor<B>>, None::<FloatTensor<B>>);
    for r in args.blocks(n) {
        let t = B::int_slice(targets.clone(), &[Slice::from(r.clone())]);
        let up = match &scale {
            Some(s) => s.clone(),
            None => B::float_slice(upstream.clone(), &[Slice::from(r.clone())]),
        };
        let l = B::float_slice(lse.clone(), &[Slice::from(r.clone())]);
        let g = B::xent_backward(logits::<B>(&h, &wt, &bias_row, &r), t, l, up, block.clone());
        dh.push(B::float_matmul(g.clone(), w.clone()));
        let g32 = f32_of(g);
        let gw = B::float_matmul(B::float_transpose(g32.clone()), f32_of(rows::<B>(h.clone(), &r)));
        let gb = B::float_sum_dim(g32, 0);
        dw = Some(match dw {
            Some(acc) => B::float_add(acc, gw),
            None => gw,
        });
        db = Some(match db {
            Some(acc) => B::float_add(acc, gb),
            None => gb,
        });
    }
    let back = |t: FloatTensor<B>| if dtype == DType::F32 { t } else { B::float_cast(t, dtype.into()) };
    let dw = dw.unwrap_or_else(|| unreachable!("rows > 0"));
    let db = B::float_reshape(db.unwrap_or_else(|| unreachable!("rows > 0")), Shape::new([v]));
    let dh = B::float_cat(dh, 0);
    debug_assert_eq!(dims::<B>(&dh), [n, d]);
    (dh, back(dw), back(db))
}
