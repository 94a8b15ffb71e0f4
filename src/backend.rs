//! [`Backend`]: the one interface every path implements — a description of the problem,
//! the options, one [`evaluate`](Backend::evaluate) — so that the CLI, `xent check` and
//! the tests treat the GPU and the CPU alike. [`BackendExt`] adds two short
//! conveniences for the common case, written on top of it.

use crate::error::Result;
use crate::options::{LossOptions, LossOutput, Targets};
use crate::problem::{Gradient, Logits, Problem};

/// A way to evaluate the loss: the GPU ([`GpuContext`](crate::GpuContext)), the fast CPU
/// path ([`CpuFast`]), the f64 reference ([`Reference`]).
///
/// ```
/// use xent::{Backend, CpuFast, Gradient, Labels, Logits, LossOptions, Problem, Reduction};
/// let logits = vec![0.5f32, 1.5, -1.0, 2.0, 0.0, 0.0];
/// let targets = [1i64, 0];
/// let problem = Problem::new(Logits::F32(&logits), 3, Labels::from(&targets)).gradient(Gradient::Owned);
/// let out = CpuFast.evaluate(problem, &LossOptions::new().reduction(Reduction::Sum))?;
/// assert_eq!(out.gradient.unwrap().len(), 6);
/// # Ok::<(), xent::Error>(())
/// ```
pub trait Backend: Send + Sync {
    /// A short description ("gpu: llvmpipe (Vulkan)", "cpu reference (f64)").
    fn describe(&self) -> String;

    /// Evaluates `problem` under `opts`: the loss (unless a backward), the row losses and
    /// LSE when asked (always the row losses for `none`), the z-loss part, and the
    /// gradient where [`Problem::gradient`] says. Every cell of the support matrix works
    /// on every path; what a path cannot do is an [`Error::Unsupported`](crate::Error)
    /// naming the combination.
    fn evaluate(&self, problem: Problem<'_>, opts: &LossOptions) -> Result<LossOutput>;
}

/// The common case in one line, on any [`Backend`].
///
/// ```
/// use xent::{BackendExt, LossOptions, Reference};
/// let logits = [2.0f32, 0.5, -1.0, 0.0, 0.0, 0.0];
/// let out = Reference.cross_entropy(&logits, 3, &[0i64, 2], &LossOptions::new())?;
/// assert!((out.loss.unwrap() - 0.66996).abs() < 1e-4);
/// # Ok::<(), xent::Error>(())
/// ```
pub trait BackendExt: Backend {
    /// Cross-entropy of f32 `logits` [rows, classes] against class indices: the loss (and
    /// the row losses for `none`).
    fn cross_entropy<'t>(
        &self,
        logits: &[f32],
        classes: usize,
        targets: impl Into<Targets<'t>>,
        opts: &LossOptions,
    ) -> Result<LossOutput> {
        self.evaluate(Problem::new(Logits::F32(logits), classes, targets.into()), opts)
    }

    /// As [`cross_entropy`](Self::cross_entropy), with the gradient d(loss)/d(logits) in
    /// [`LossOutput::gradient`].
    fn cross_entropy_with_grad<'t>(
        &self,
        logits: &[f32],
        classes: usize,
        targets: impl Into<Targets<'t>>,
        opts: &LossOptions,
    ) -> Result<LossOutput> {
        let problem = Problem::new(Logits::F32(logits), classes, targets.into()).gradient(Gradient::Owned);
        self.evaluate(problem, opts)
    }
}

impl<B: Backend + ?Sized> BackendExt for B {}

/// A borrowed path is a path: a set of shards ([`RowShards`](crate::RowShards)) may hold
/// contexts that live elsewhere.
impl<B: Backend + ?Sized> Backend for &B {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn evaluate(&self, problem: Problem<'_>, opts: &LossOptions) -> Result<LossOutput> {
        (**self).evaluate(problem, opts)
    }
}

/// The f64 CPU reference as a [`Backend`]: plain code that validates every other path.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Backend for Reference {
    fn describe(&self) -> String {
        "cpu reference (f64)".into()
    }
    fn evaluate(&self, problem: Problem<'_>, opts: &LossOptions) -> Result<LossOutput> {
        crate::front::evaluate(self, problem, opts)
    }
}

/// The fast multi-threaded CPU path as a [`Backend`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuFast;

impl Backend for CpuFast {
    fn describe(&self) -> String {
        format!("cpu fast ({} threads)", rayon::current_num_threads())
    }
    fn evaluate(&self, problem: Problem<'_>, opts: &LossOptions) -> Result<LossOutput> {
        crate::front::evaluate(self, problem, opts)
    }
}
