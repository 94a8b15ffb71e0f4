//! [`Backend`]: the one interface every path implements — a description of the problem,
//! the options, one [`evaluate`](Backend::evaluate) — so that the CLI, `xent check` and
//! the tests treat the GPU and the CPU alike. [`BackendExt`] adds two short
//! conveniences for the common case, written on top of it.

use crate::error::Result;
use crate::options::{LossOptions, LossOutput, Targets, Upstream};
use crate::problem::{Gradient, Logits, Problem};
use crate::row_state::RowState;
use crate::vocab::{ColumnShard, VocabPartial};

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

    /// Vocabulary-parallel step 1 ([`crate::vocab`]): the per-row partial of a shard of
    /// the vocabulary (class-index targets and options of the whole problem). A path that
    /// computes whole rows only returns [`Error::Unsupported`](crate::Error).
    fn vocab_partials(
        &self,
        shard: ColumnShard<'_>,
        targets: Targets<'_>,
        opts: &LossOptions,
    ) -> Result<Vec<VocabPartial>> {
        let _ = (shard, targets, opts);
        Err(crate::vocab::unsupported(self.describe(), "partials"))
    }

    /// Vocabulary-parallel step 2 (the top-k metrics only): each counted row's number of
    /// the shard's logits above its target's, whose logit comes from the merged partials.
    fn vocab_above(
        &self,
        shard: ColumnShard<'_>,
        targets: Targets<'_>,
        target_logits: &[Option<f32>],
        opts: &LossOptions,
    ) -> Result<Vec<u64>> {
        let _ = (shard, targets, target_logits, opts);
        Err(crate::vocab::unsupported(self.describe(), "top-k counts"))
    }

    /// The gradient of a shard's columns from the whole rows' merged (max, sum) states
    /// ([`VocabPartial::state`], merged), times `upstream`, into `out` [rows, shard
    /// width]: no exchange beyond the partials. (The state rather than its LSE rounded to
    /// f32, so that `exp(z − max) / sum` stays exact for logits far from 0.)
    fn vocab_gradient(
        &self,
        shard: ColumnShard<'_>,
        targets: Targets<'_>,
        states: &[RowState],
        upstream: Upstream<'_>,
        opts: &LossOptions,
        out: &mut [f32],
    ) -> Result<()> {
        let _ = (shard, targets, states, upstream, opts, out);
        Err(crate::vocab::unsupported(self.describe(), "gradient"))
    }
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
    fn vocab_partials(
        &self,
        s: ColumnShard<'_>,
        t: Targets<'_>,
        o: &LossOptions,
    ) -> Result<Vec<VocabPartial>> {
        (**self).vocab_partials(s, t, o)
    }
    fn vocab_above(
        &self,
        s: ColumnShard<'_>,
        t: Targets<'_>,
        z: &[Option<f32>],
        o: &LossOptions,
    ) -> Result<Vec<u64>> {
        (**self).vocab_above(s, t, z, o)
    }
    fn vocab_gradient(
        &self,
        s: ColumnShard<'_>,
        t: Targets<'_>,
        states: &[RowState],
        up: Upstream<'_>,
        o: &LossOptions,
        out: &mut [f32],
    ) -> Result<()> {
        (**self).vocab_gradient(s, t, states, up, o, out)
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
    fn vocab_partials(
        &self,
        s: ColumnShard<'_>,
        t: Targets<'_>,
        o: &LossOptions,
    ) -> Result<Vec<VocabPartial>> {
        crate::vocab::reference_partials(s, t, o)
    }
    fn vocab_above(
        &self,
        s: ColumnShard<'_>,
        t: Targets<'_>,
        z: &[Option<f32>],
        o: &LossOptions,
    ) -> Result<Vec<u64>> {
        crate::vocab::reference_above(s, t, z, o)
    }
    fn vocab_gradient(
        &self,
        s: ColumnShard<'_>,
        t: Targets<'_>,
        states: &[RowState],
        up: Upstream<'_>,
        o: &LossOptions,
        out: &mut [f32],
    ) -> Result<()> {
        crate::vocab::reference_gradient(s, t, states, up, o, out)
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
    fn vocab_partials(
        &self,
        s: ColumnShard<'_>,
        t: Targets<'_>,
        o: &LossOptions,
    ) -> Result<Vec<VocabPartial>> {
        let batch = crate::vocab::checked(&s, t, o)?;
        Ok(crate::cpu::fast_vocab::partials(&s, &batch, o))
    }
    fn vocab_above(
        &self,
        s: ColumnShard<'_>,
        t: Targets<'_>,
        z: &[Option<f32>],
        o: &LossOptions,
    ) -> Result<Vec<u64>> {
        let batch = crate::vocab::checked(&s, t, o)?;
        crate::vocab::check_rows("target logits", z.len(), batch.rows)?;
        Ok(crate::cpu::fast_vocab::above(&s, &batch, z, o))
    }
    fn vocab_gradient(
        &self,
        s: ColumnShard<'_>,
        t: Targets<'_>,
        states: &[RowState],
        up: Upstream<'_>,
        o: &LossOptions,
        out: &mut [f32],
    ) -> Result<()> {
        let batch = crate::vocab::checked_gradient(&s, t, states, up, o, out)?;
        crate::cpu::fast_vocab::gradient(&s, &batch, states, up, o, out);
        Ok(())
    }
}
