//! The GPU behind the front door: which cells of the support matrix the kernels compute
//! themselves, and how a [`Problem`] becomes a call of the streaming driver
//! ([`super::stream`]), the soft-target or the binary path. The front door composes the
//! rest from these (row blocks of f32 for half-precision probability or binary targets,
//! an odd number of half-precision classes, in-place gradients of those, half gradients of
//! a backward).

use crate::backend::Backend;
use crate::error::Result;
use crate::front::{Native, with_outputs};
use crate::options::{Batch, LossOptions, LossOutput, Reduction, Upstream};
use crate::problem::{Gradient, Labels, Logits, Mode, Problem};

use super::context::GpuContext;
use super::plan::{GradKind, Layout, Plan};
use super::soft::SoftRun;
use super::stream::{Data, GradOut, Io};

impl Backend for GpuContext {
    fn describe(&self) -> String {
        format!("{} ({:?})", self.adapter_info().name, self.adapter_info().backend)
    }

    fn evaluate(&self, problem: Problem<'_>, opts: &LossOptions) -> Result<LossOutput> {
        crate::front::evaluate(self, problem, opts)
    }

    fn vocab_partials(
        &self,
        shard: crate::vocab::ColumnShard<'_>,
        targets: crate::Targets<'_>,
        opts: &LossOptions,
    ) -> Result<Vec<crate::vocab::VocabPartial>> {
        let batch = crate::vocab::checked(&shard, targets, opts)?;
        self.vocab_partials_host(&shard, &batch, opts)
    }

    fn vocab_above(
        &self,
        shard: crate::vocab::ColumnShard<'_>,
        targets: crate::Targets<'_>,
        target_logits: &[Option<f32>],
        opts: &LossOptions,
    ) -> Result<Vec<u64>> {
        let batch = crate::vocab::checked(&shard, targets, opts)?;
        crate::vocab::check_rows("target logits", target_logits.len(), batch.rows)?;
        self.vocab_above_host(&shard, &batch, target_logits, opts)
    }

    fn vocab_gradient(
        &self,
        shard: crate::vocab::ColumnShard<'_>,
        targets: crate::Targets<'_>,
        states: &[crate::RowState],
        upstream: crate::Upstream<'_>,
        opts: &LossOptions,
        out: &mut [f32],
    ) -> Result<()> {
        let batch = crate::vocab::checked_gradient(&shard, targets, states, upstream, opts, out)?;
        self.vocab_gradient_host(&shard, &batch, states, upstream, opts, out)
    }
}

impl GpuContext {
    /// The path's name in [`crate::Error::Unsupported`].
    pub(crate) fn path_name(&self) -> String {
        format!("gpu: {}", self.describe())
    }

    /// Whether the fused kernel reads half-precision rows of `classes` in place: two per
    /// 32-bit word (an even number of classes), in rows that fit one binding.
    fn reads_half(&self, rows: usize, classes: usize, grad: GradKind) -> bool {
        classes.is_multiple_of(2)
            && Plan::new(rows, classes, grad, &self.plan_limits())
                .is_ok_and(|plan| !matches!(plan.layout, Layout::Split { .. }))
    }

    /// The fused class-index loss through the streaming driver, with the z-loss part
    /// divided by the counted rows under `mean` (the kernels divide the whole row loss by
    /// the cross-entropy denominator; the z-loss terms are added back from the LSE).
    fn classes_fused(&self, io: Io<'_>, batch: &Batch, opts: &LossOptions) -> Result<LossOutput> {
        let s = opts.get_z_loss();
        let reduction = opts.get_reduction();
        if s == 0.0 || reduction == Reduction::None {
            return self.run(io, batch, opts);
        }
        let mut out = self.run(io, batch, &opts.clone().lse(true))?;
        let lse = out.lse.take().unwrap_or_default();
        let z_sum: f64 = batch
            .targets
            .iter()
            .zip(&lse)
            .filter(|(t, _)| **t != Batch::IGNORED)
            .map(|(_, &l)| s * f64::from(l) * f64::from(l))
            .sum();
        let (d, dz) = (batch.divisor(reduction), batch.z_divisor(reduction));
        if let Some(loss) = out.loss.filter(|_| d != dz) {
            out.loss = Some((f64::from(loss) + z_sum * (1.0 / dz - 1.0 / d)) as f32);
        }
        out.z_loss = Some((z_sum / dz) as f32);
        out.lse = opts.wants_lse().then_some(lse);
        Ok(out)
    }
}

impl Native for GpuContext {
    fn takes(&self, problem: &Problem<'_>, _: &LossOptions) -> bool {
        let kind = match problem.gradient {
            Gradient::None => GradKind::None,
            Gradient::InPlace => GradKind::InPlace,
            _ => GradKind::Separate,
        };
        match (&problem.logits, &problem.gradient, &problem.mode, &problem.labels) {
            (Logits::F32(_) | Logits::F32Mut(_), Gradient::None | Gradient::IntoF32(_), _, _) => true,
            (Logits::F32Mut(_), Gradient::InPlace, Mode::Fused, Labels::Classes(_)) => true,
            (
                Logits::Half(..),
                Gradient::None | Gradient::IntoF32(_) | Gradient::IntoHalf(_),
                Mode::Fused,
                Labels::Classes(_),
            )
            | (Logits::HalfMut(..), Gradient::InPlace, Mode::Fused, Labels::Classes(_)) => {
                self.reads_half(problem.rows(), problem.classes, kind)
            }
            _ => false,
        }
    }

    fn native(&self, problem: Problem<'_>, opts: &LossOptions) -> Result<LossOutput> {
        let o = with_outputs(&problem, opts);
        let v = problem.classes;
        let n = problem.logits.len();
        match (problem.labels, problem.mode) {
            (Labels::Classes(t), Mode::Fused) => {
                let batch = Batch::new(n, v, t, &o)?;
                let io = match (problem.logits, problem.gradient) {
                    (Logits::F32Mut(x), Gradient::InPlace) => Io::InPlace(GradOut::F32(x), None),
                    (Logits::HalfMut(x, f), Gradient::InPlace) => Io::InPlace(GradOut::Half(x), Some(f)),
                    (logits, gradient) => {
                        let data = match logits {
                            Logits::F32(x) => Data::F32(x),
                            Logits::F32Mut(x) => Data::F32(x),
                            Logits::Half(x, f) => Data::Half(x, f),
                            Logits::HalfMut(x, f) => Data::Half(x, f),
                            Logits::Linear(_) => unreachable!("a linear head goes to Native::linear"),
                        };
                        match gradient {
                            Gradient::IntoF32(g) => Io::Separate(data, GradOut::F32(g)),
                            Gradient::IntoHalf(g) => Io::Separate(data, GradOut::Half(g)),
                            _ => Io::Loss(data),
                        }
                    }
                };
                self.classes_fused(io, &batch, &o)
            }
            (Labels::Classes(t), Mode::Backward { lse, upstream }) => {
                let (Some(x), Gradient::IntoF32(g)) = (f32_logits(&problem.logits), problem.gradient) else {
                    unreachable!("takes() accepts f32 backwards into f32")
                };
                let lse = lse.expect("checked: a cross-entropy backward has its LSE");
                self.cross_entropy_backward_into(x, v, t, lse, upstream, &o, g)?;
                Ok(LossOutput::default())
            }
            (Labels::Probabilities(t), mode) => {
                let x = f32_logits(&problem.logits).expect("takes() accepts f32 logits");
                let grad = match problem.gradient {
                    Gradient::IntoF32(g) => Some(g),
                    _ => None,
                };
                self.soft(x, v, t, SoftRun { mode, grad }, &o)
            }
            (Labels::Binary(t), mode) => {
                let x = f32_logits(&problem.logits).expect("takes() accepts f32 logits");
                let grad = match problem.gradient {
                    Gradient::IntoF32(g) => Some(g),
                    _ => None,
                };
                let (upstream, backward) = match mode {
                    Mode::Fused => (Upstream::Scalar(1.0), false),
                    Mode::Backward { upstream, .. } => (upstream, true),
                };
                self.binary(x, v, t, grad, upstream, backward, &o)
            }
        }
    }

    fn linear(&self, task: crate::head::LinearTask<'_>, opts: &LossOptions) -> Result<LossOutput> {
        self.linear_head(task, opts)
    }
}

impl GpuContext {
    /// Metrics of half logits (or of more rows than one binding, device-resident) on an
    /// adapter without the ninth storage buffer the fused kernel's record binding needs
    /// (f32 logits take the row grid there).
    pub(crate) fn no_metrics_binding(&self) -> crate::Error {
        crate::Error::Unsupported {
            path: self.path_name(),
            cell: "evaluation metrics of half-precision logits, or of device-resident rows beyond one binding"
                .into(),
            why: "the adapter has 8 storage buffers per shader stage: the fused kernel's metric records need a \
                  ninth, and the row grid that does without reads f32 rows within one binding; convert the \
                  logits to f32 or use the CPU paths"
                .into(),
        }
    }
}

/// The f32 logits of a problem, read only.
fn f32_logits<'a>(logits: &'a Logits<'_>) -> Option<&'a [f32]> {
    match logits {
        Logits::F32(x) => Some(x),
        Logits::F32Mut(x) => Some(x),
        _ => None,
    }
}
