//! Every path against PyTorch (float64) on the committed cases in tests/data, made by
//! scripts/make_reference.py: every option and their combinations, every reduction,
//! loss and gradient.

mod common;

use std::path::{Path, PathBuf};

use xent::check::{Tolerance, compare};
use xent::npy::{self, NpyData};
use xent::{
    Backend, Gradient, HalfFormat, Labels, Logits, LossOptions, LossOutput, Problem, Reduction, Reference,
    Upstream,
};

const REDUCTIONS: [Reduction; 3] = [Reduction::Mean, Reduction::Sum, Reduction::None];

/// The case folders of tests/data whose names `keep` accepts, sorted; at least `min`.
fn case_dirs(what: &str, min: usize, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut dirs: Vec<_> =
        std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).filter(|p| keep(&name(p))).collect();
    dirs.sort();
    assert!(dirs.len() >= min, "tests/data holds {} {what} cases; run scripts/make_reference.py", dirs.len());
    dirs
}

fn name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

fn f32s(path: &Path) -> Vec<f32> {
    match npy::read(path).unwrap().data {
        NpyData::F32(v) => v,
        other => panic!("{}: {other:?}", path.display()),
    }
}

fn f64s(path: &Path) -> Vec<f64> {
    match npy::read(path).unwrap().data {
        NpyData::F64(v) => v,
        other => panic!("{}: {other:?}", path.display()),
    }
}

/// The classes of a case: the logits' second dimension.
fn classes(dir: &Path) -> usize {
    npy::read(dir.join("logits.npy")).unwrap().shape[1]
}

/// PyTorch's loss and gradient for one reduction, as f32.
fn expected(dir: &Path, reduction: Reduction) -> LossOutput {
    let r = reduction.name();
    let loss = f64s(&dir.join(format!("loss_{r}.npy")));
    let grad = f64s(&dir.join(format!("grad_{r}.npy")));
    let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    LossOutput {
        loss: (reduction != Reduction::None).then(|| loss[0] as f32),
        row_losses: (reduction == Reduction::None).then(|| as_f32(&loss)),
        lse: None,
        gradient: Some(as_f32(&grad)),
        ..Default::default()
    }
}

/// Every path: the reference, the fast CPU path, every GPU of `common::gpus`.
fn every_path(test: &str) -> Vec<&'static dyn Backend> {
    [&Reference as &dyn Backend, &xent::CpuFast]
        .into_iter()
        .chain(common::gpus(test).iter().map(|g| g as &dyn Backend))
        .collect()
}

/// How the gradient is produced; each way is compared with PyTorch's loss and gradient.
#[derive(Clone, Copy, Debug)]
enum Way {
    /// Fused, the gradient in `LossOutput::gradient` (`Gradient::Owned`).
    Owned,
    /// Fused, the gradient into the caller's f32 slice (`Gradient::IntoF32`).
    IntoF32,
    /// Fused, the gradient over a copy of the logits (`Logits::F32Mut` + `Gradient::InPlace`).
    InPlace,
    /// A loss-only forward that saves the LSE (cross-entropy), then a separate backward
    /// with an upstream gradient of 1 (`Upstream::Scalar(1.0)`, PyTorch's
    /// `loss.backward(torch.ones_like(loss))`); binary cross-entropy takes no LSE.
    Backward,
}

/// Half an ULP of `x` in f32: how far rounding to f32 may move it.
fn half_ulp(x: f32) -> f64 {
    let a = x.abs();
    (f64::from(f32::from_bits(a.to_bits() + 1)) - f64::from(a)) / 2.0
}

/// The least error f32 itself may cost a separate backward: the saved LSE and each
/// transformed logit z (under a logit scale or a softcap; plain logits are exact) are f32
/// values, each up to half an ULP from the exact one, and `p = exp(z − lse)` carries both
/// as relative errors, whatever the path computes after. (The fused pass cancels most of
/// it: its LSE comes from the same rounded z.) The largest such move of a gradient
/// element, `(half_ulp(lse) + half_ulp(z)) · |grad|`; where it exceeds the tolerance, no
/// f32 backward can be held to PyTorch's gradient under it. At logits near 1e4
/// (`offset_masked`) it is 4.1e-5 under `mean` and 4.9e-4 under `sum` (every path, the
/// reference included, misses by 9e-6 to 1.5e-5, exactly what the rounded LSE predicts);
/// near 1e3 (`smoothing_offset`) 5.2e-6 and 5.2e-5 (misses by 7.7e-6 under `sum`); under
/// softcap 20 with class weights near 1.7 (`everything`, `sum` and `none`) 1.3e-6, where
/// the GPUs miss by 1.2e-6 (the fused pass: 6e-7). Every other case is below 4.1e-7.
fn backward_floor(logits: &[f32], classes: usize, lse: &[f32], opts: &LossOptions, grad: &[f32]) -> f64 {
    let (scale, cap) = (opts.get_logit_scale(), opts.get_softcap());
    let transformed = scale != 1.0 || cap.is_some();
    let mut floor = 0.0f64;
    for (r, (row, g)) in logits.chunks(classes).zip(grad.chunks(classes)).enumerate() {
        if !lse[r].is_finite() {
            continue;
        }
        for (&x, &g) in row.iter().zip(g) {
            let z = match cap {
                Some(c) => c * (f64::from(x) * scale / c).tanh(),
                None => f64::from(x) * scale,
            };
            let z_err = if transformed && z.is_finite() { half_ulp(z as f32) } else { 0.0 };
            floor = floor.max((half_ulp(lse[r]) + z_err) * f64::from(g.abs()));
        }
    }
    floor
}

/// Evaluates `labels` on `backend` the `way` says and compares with `want` (PyTorch's).
/// Returns whether the gradient was compared: a separate backward compares only the loss
/// of its forward where f32 cannot carry the gradient ([`backward_floor`]).
fn check_way(
    backend: &dyn Backend,
    logits: &[f32],
    classes: usize,
    labels: Labels<'_>,
    opts: &LossOptions,
    want: &LossOutput,
    way: Way,
) -> Result<bool, String> {
    let problem = |logits| Problem::new(logits, classes, labels);
    let fail = |e: xent::Error| e.to_string();
    let got = match way {
        Way::Owned => {
            backend.evaluate(problem(Logits::F32(logits)).gradient(Gradient::Owned), opts).map_err(fail)?
        }
        Way::IntoF32 => {
            let mut grad = vec![f32::NAN; logits.len()];
            let out = backend
                .evaluate(problem(Logits::F32(logits)).gradient(Gradient::IntoF32(&mut grad)), opts)
                .map_err(fail)?;
            if out.gradient.is_some() {
                return Err("a gradient into a slice also came back owned".into());
            }
            LossOutput { gradient: Some(grad), ..out }
        }
        Way::InPlace => {
            let mut in_place = logits.to_vec();
            let out = backend
                .evaluate(problem(Logits::F32Mut(&mut in_place)).gradient(Gradient::InPlace), opts)
                .map_err(fail)?;
            LossOutput { gradient: Some(in_place), ..out }
        }
        Way::Backward => {
            let lse = match labels {
                Labels::Binary(_) => None,
                _ => {
                    // The forward: the loss alone, and the LSE it saves.
                    let forward =
                        backend.evaluate(problem(Logits::F32(logits)).lse(true), opts).map_err(fail)?;
                    let loss_only = LossOutput { gradient: None, ..want.clone() };
                    compare(&forward, &loss_only, Tolerance::F32).map_err(|e| format!("forward: {e}"))?;
                    let lse = forward.lse.ok_or("the forward returned no LSE")?;
                    let grad = want.gradient.as_deref().unwrap();
                    let floor = backward_floor(logits, classes, &lse, opts, grad);
                    if floor > Tolerance::F32.grad_atol {
                        return Ok(false);
                    }
                    Some(lse)
                }
            };
            let out = backend
                .evaluate(problem(Logits::F32(logits)).backward(lse.as_deref(), Upstream::Scalar(1.0)), opts)
                .map_err(fail)?;
            if out.loss.is_some() || out.row_losses.is_some() {
                return Err(format!("a backward returned a loss: {:?} {:?}", out.loss, out.row_losses));
            }
            // The gradient alone is compared.
            let gradient_only = LossOutput { gradient: want.gradient.clone(), ..Default::default() };
            return compare(&out, &gradient_only, Tolerance::F32)
                .map(|_| true)
                .map_err(|e| format!("backward: {e}"));
        }
    };
    compare(&got, want, Tolerance::F32).map(|_| true)
}

/// Counts the evaluations whose gradient was compared with PyTorch's, and those that were
/// not; at most `max_skipped` of every 16 may skip.
#[derive(Default)]
struct Count {
    compared: usize,
    skipped: usize,
}

impl Count {
    fn note(&mut self, compared: bool, case: &str, reduction: Reduction, way: Way, backend: &dyn Backend) {
        if compared {
            self.compared += 1;
        } else {
            self.skipped += 1;
            eprintln!(
                "{case} {reduction:?} {way:?} on {}: the gradient not compared with PyTorch's \
                 (f32 alone may cost it more than the tolerance)",
                backend.describe()
            );
        }
    }
    fn at_most_skipped(&self, what: &str, max_skipped: usize) {
        let total = self.compared + self.skipped;
        assert!(
            self.skipped * 16 <= max_skipped * total,
            "{what}: {} of {total} gradients not compared with PyTorch's",
            self.skipped
        );
    }
}

/// A class-index case.
struct Case {
    dir: PathBuf,
    name: String,
    logits: Vec<f32>,
    classes: usize,
    targets: Vec<i64>,
    opts: LossOptions,
}

fn cases() -> Vec<Case> {
    // (metrics_ folders are tests/metrics.rs's.)
    let kinds = ["bce_", "soft_", "half_", "linear_", "metrics_"];
    let dirs = case_dirs("class-index", 15, |n| !kinds.iter().any(|k| n.starts_with(k)));
    dirs.into_iter()
        .map(|dir| {
            let NpyData::I64(targets) = npy::read(dir.join("targets.npy")).unwrap().data else {
                panic!("targets")
            };
            Case {
                name: name(&dir),
                logits: f32s(&dir.join("logits.npy")),
                classes: classes(&dir),
                targets,
                opts: common::case_options(&dir),
                dir,
            }
        })
        .collect()
}

fn check_backend(backend: &dyn Backend) {
    check_backend_where(backend, |_| true);
}

fn check_backend_where(backend: &dyn Backend, include: impl Fn(&LossOptions) -> bool) {
    let count = check_class_indices(backend, include, &[Way::Owned, Way::InPlace]);
    count.at_most_skipped("fused", 0);
}

/// The class-index cases that `include` accepts on `backend`, every reduction, each way.
fn check_class_indices(backend: &dyn Backend, include: impl Fn(&LossOptions) -> bool, ways: &[Way]) -> Count {
    let mut count = Count::default();
    for case in cases().into_iter().filter(|c| include(&c.opts)) {
        for reduction in REDUCTIONS {
            let opts = case.opts.clone().reduction(reduction);
            let want = expected(&case.dir, reduction);
            for &way in ways {
                let labels = Labels::from(&case.targets);
                let compared = check_way(backend, &case.logits, case.classes, labels, &opts, &want, way)
                    .unwrap_or_else(|e| {
                        panic!("{} {reduction:?} {way:?} on {}: {e}", case.name, backend.describe())
                    });
                count.note(compared, &case.name, reduction, way, backend);
            }
        }
    }
    count
}

#[test]
fn the_reference_matches_pytorch() {
    check_backend(&xent::Reference);
}

#[test]
fn the_fast_cpu_path_matches_pytorch() {
    check_backend(&xent::CpuFast);
}

#[test]
fn every_gpu_matches_pytorch() {
    for gpu in common::gpus("every_gpu_matches_pytorch") {
        check_backend(gpu);
    }
}

#[test]
fn every_gpu_tuning_matches_pytorch() {
    // Both kernel paths (register-cached and streaming) and both element widths with
    // every option: the cases have V from 17 to 64; 8 invocations of 4 cached values
    // each send most of them down the streaming path.
    let gpus = common::gpus("every_gpu_tuning_matches_pytorch");
    let Some(first) = gpus.first() else { return };
    let adapter = common::adapter_of(first);
    for tuning in [
        xent::gpu::Tuning::GPU,
        xent::gpu::Tuning {
            workgroup_size: 8,
            elems_per_thread: 4,
            max_threads_per_row: 8,
            cached_per_thread: 4,
            // One row per 8-invocation workgroup: the subgroup merge where the adapter
            // has SUBGROUP, with a subgroup that may be larger than the workgroup.
            subgroups: true,
            // Two workgroups, each taking every other row in turn.
            max_workgroups: 2,
            few_rows: 64,
            portable_f16: false,
        },
    ] {
        let gpu = pollster::block_on(xent::GpuContext::from_adapter_tuned(&adapter, tuning)).unwrap();
        check_backend(&gpu);
    }
}

/// The cases of tests/data whose folder names start with `prefix` (float targets), every
/// reduction, each way, on `backend`; `labels` makes the labels of the targets.
fn check_float_targets(
    backend: &dyn Backend,
    what: &str,
    prefix: &str,
    min: usize,
    labels: fn(&[f32]) -> Labels<'_>,
    ways: &[Way],
) -> Count {
    let mut count = Count::default();
    for dir in case_dirs(what, min, |n| n.starts_with(prefix)) {
        let (name, logits, targets) =
            (name(&dir), f32s(&dir.join("logits.npy")), f32s(&dir.join("targets.npy")));
        for reduction in REDUCTIONS {
            let opts = common::case_options(&dir).reduction(reduction);
            let want = expected(&dir, reduction);
            for &way in ways {
                let compared =
                    check_way(backend, &logits, classes(&dir), labels(&targets), &opts, &want, way)
                        .unwrap_or_else(|e| {
                            panic!("{name} {reduction:?} {way:?} on {}: {e}", backend.describe())
                        });
                count.note(compared, &name, reduction, way, backend);
            }
        }
    }
    count
}

fn check_binary(backend: &dyn Backend, ways: &[Way]) -> Count {
    check_float_targets(backend, "binary", "bce_", 5, |t| Labels::Binary(t), ways)
}

#[test]
fn binary_cross_entropy_matches_pytorch_on_every_path() {
    for backend in every_path("binary_cross_entropy_matches_pytorch") {
        check_binary(backend, &[Way::Owned]).at_most_skipped("binary", 0);
    }
}

#[test]
fn binary_cross_entropy_gradient_into_f32_in_place_and_backward_match_pytorch_on_every_path() {
    for backend in every_path("binary_cross_entropy_gradient_into_f32_in_place_and_backward") {
        // Binary cross-entropy's backward recomputes from the logits: nothing to skip.
        check_binary(backend, &[Way::IntoF32, Way::InPlace, Way::Backward]).at_most_skipped("binary", 0);
    }
}

#[test]
fn class_index_gradient_into_f32_and_backward_from_the_saved_lse_match_pytorch_on_every_path() {
    for backend in every_path("class_index_gradient_into_f32_and_backward_from_the_saved_lse") {
        // The two offset cases (every reduction) and `everything` under sum and none skip
        // the backward's gradient comparison (`backward_floor`): 8 of the 45 backwards, 8
        // of 90 evaluations; their forward's loss is still compared.
        check_class_indices(backend, |_| true, &[Way::IntoF32, Way::Backward])
            .at_most_skipped("class index", 2);
    }
}

#[test]
fn binary_cross_entropy_streams_through_tiny_limits() {
    // Pieces of a 64 KiB binding that cut rows, against the reference.
    let Some(mut gpu) = common::tiny_device(common::gpus("binary_cross_entropy_streams")) else { return };
    gpu.set_memory_budget(200_000);
    let (n, v) = (97, 401);
    let logits = xent::synth::logits(n, v, 3.0, 81);
    let targets: Vec<f32> =
        xent::synth::logits(n, v, 1.0, 82).iter().map(|x| (x.abs() * 0.7).min(1.0)).collect();
    let pos: Vec<f32> = (0..v).map(|c| 0.5 + (c % 4) as f32).collect();
    let problem = || Problem::new(Logits::F32(&logits), v, Labels::Binary(&targets));
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let opts = LossOptions::new().reduction(reduction).pos_weight(pos.clone());
        let want = Reference.evaluate(problem().gradient(Gradient::Owned), &opts).unwrap();
        let got = gpu.evaluate(problem().gradient(Gradient::Owned), &opts).unwrap();
        compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{reduction:?}: {e}"));
    }
    // Options that do not apply are refused.
    let e = gpu.evaluate(problem(), &LossOptions::new().label_smoothing(0.1)).unwrap_err();
    assert!(matches!(e, xent::Error::InvalidOption(_)), "{e}");
}

fn check_soft(backend: &dyn Backend, ways: &[Way]) -> Count {
    // The same files as a class-index case, with float targets.
    check_float_targets(backend, "soft-target", "soft_", 4, |t| Labels::Probabilities(t), ways)
}

#[test]
fn probability_targets_match_pytorch_on_every_path() {
    for backend in every_path("probability_targets_match_pytorch") {
        check_soft(backend, &[Way::Owned]).at_most_skipped("probabilities", 0);
    }
}

#[test]
fn probability_targets_gradient_into_f32_in_place_and_backward_from_the_saved_lse_match_pytorch_on_every_path()
 {
    for backend in every_path("probability_targets_gradient_into_f32_in_place_and_backward") {
        check_soft(backend, &[Way::IntoF32, Way::InPlace, Way::Backward]).at_most_skipped("probabilities", 0);
    }
}

#[test]
fn probability_targets_stream_in_chunks() {
    let Some(mut gpu) = common::tiny_device(common::gpus("probability_targets_stream_in_chunks")) else {
        return;
    };
    gpu.set_memory_budget(100_000);
    let (n, v) = (150, 300);
    let logits = xent::synth::logits(n, v, 2.0, 91);
    let raw = xent::synth::logits(n, v, 1.0, 92);
    let targets: Vec<f32> = raw
        .chunks(v)
        .flat_map(|row| {
            let s: f32 = row.iter().map(|x| x.abs()).sum();
            row.iter().map(move |x| x.abs() / s).collect::<Vec<_>>()
        })
        .collect();
    let problem = || {
        Problem::new(Logits::F32(&logits), v, Labels::Probabilities(&targets))
            .gradient(Gradient::Owned)
            .lse(true)
    };
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let opts = LossOptions::new().reduction(reduction).label_smoothing(0.1);
        let want = Reference.evaluate(problem(), &opts).unwrap();
        let got = gpu.evaluate(problem(), &opts).unwrap();
        compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{reduction:?}: {e}"));
    }
}

#[test]
fn float16_logits_match_pytorch_on_every_path() {
    let backends = every_path("float16_logits_match_pytorch");
    for dir in case_dirs("float16", 2, |n| n.starts_with("half_")) {
        let name = name(&dir);
        let NpyData::F16(bits) = npy::read(dir.join("logits.npy")).unwrap().data else {
            panic!("float16 logits")
        };
        let NpyData::I64(targets) = npy::read(dir.join("targets.npy")).unwrap().data else {
            panic!("targets")
        };
        let classes = classes(&dir);
        for reduction in REDUCTIONS {
            let want = expected(&dir, reduction);
            let opts = common::case_options(&dir).reduction(reduction);
            for &backend in &backends {
                let problem =
                    Problem::new(Logits::Half(&bits, HalfFormat::F16), classes, Labels::from(&targets));
                let got = backend
                    .evaluate(problem.gradient(Gradient::Owned), &opts)
                    .unwrap_or_else(|e| panic!("{name} {reduction:?} on {}: {e}", backend.describe()));
                compare(&got, &want, Tolerance::F32)
                    .unwrap_or_else(|e| panic!("{name} {reduction:?} on {}: {e}", backend.describe()));
            }
        }
    }
}

/// A path that counts its evaluations, so that a test of shards proves each one ran.
struct Counted {
    inner: &'static dyn Backend,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Backend for Counted {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn evaluate(&self, problem: Problem<'_>, opts: &LossOptions) -> xent::Result<LossOutput> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.evaluate(problem, opts)
    }
    fn vocab_partials(
        &self,
        shard: xent::vocab::ColumnShard<'_>,
        targets: xent::Targets<'_>,
        opts: &LossOptions,
    ) -> xent::Result<Vec<xent::vocab::VocabPartial>> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.vocab_partials(shard, targets, opts)
    }
    fn vocab_above(
        &self,
        shard: xent::vocab::ColumnShard<'_>,
        targets: xent::Targets<'_>,
        target_logits: &[Option<f32>],
        opts: &LossOptions,
    ) -> xent::Result<Vec<u64>> {
        self.inner.vocab_above(shard, targets, target_logits, opts)
    }
    fn vocab_gradient(
        &self,
        shard: xent::vocab::ColumnShard<'_>,
        targets: xent::Targets<'_>,
        states: &[xent::RowState],
        upstream: Upstream<'_>,
        opts: &LossOptions,
        out: &mut [f32],
    ) -> xent::Result<()> {
        self.inner.vocab_gradient(shard, targets, states, upstream, opts, out)
    }
}

/// Vocabulary shards over 2, 3 and 7 paths of one process (`xent::VocabShards`), taken from
/// the reference, the fast CPU path and every GPU in turn: every class-index and float16
/// case, every reduction, the gradient owned and into a slice, against PyTorch at the
/// unsharded tolerances; each path of each set ran; the cells a vocabulary split does not
/// take are typed errors.
#[test]
fn vocab_shards_over_every_path_match_pytorch() {
    let paths = every_path("vocab_shards_over_every_path_match_pytorch");
    for count in [2, 3, 7] {
        let calls: Vec<_> = (0..count).map(|_| std::sync::Arc::default()).collect();
        let shards = xent::VocabShards::new(
            calls
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    Box::new(Counted { inner: paths[k % paths.len()], calls: std::sync::Arc::clone(c) })
                        as Box<dyn Backend>
                })
                .collect(),
        )
        .unwrap();
        check_class_indices(&shards, |_| true, &[Way::Owned, Way::IntoF32])
            .at_most_skipped("vocabulary shards", 0);
        for dir in case_dirs("float16", 2, |n| n.starts_with("half_")) {
            let NpyData::F16(bits) = npy::read(dir.join("logits.npy")).unwrap().data else {
                panic!("float16 logits")
            };
            let NpyData::I64(targets) = npy::read(dir.join("targets.npy")).unwrap().data else {
                panic!("targets")
            };
            for reduction in REDUCTIONS {
                let opts = common::case_options(&dir).reduction(reduction);
                let problem =
                    Problem::new(Logits::Half(&bits, HalfFormat::F16), classes(&dir), Labels::from(&targets));
                let got = shards.evaluate(problem.gradient(Gradient::Owned), &opts).unwrap();
                compare(&got, &expected(&dir, reduction), Tolerance::F32)
                    .unwrap_or_else(|e| panic!("{} {reduction:?} on {}: {e}", name(&dir), shards.describe()));
            }
        }
        for (k, c) in calls.iter().enumerate() {
            let n = c.load(std::sync::atomic::Ordering::Relaxed);
            assert!(n > 0, "{count} shards: shard {k} ({}) never ran", paths[k % paths.len()].describe());
        }
        let (x, bits) = ([0.5f32, 1.0, -1.0, 2.0], [0.0f32, 1.0, 1.0, 0.0]);
        let (t, lse) = ([1i64, 0], [1.5f32, 2.1]);
        let backward =
            Problem::new(Logits::F32(&x), 2, Labels::from(&t)).backward(Some(&lse), Upstream::Scalar(1.0));
        let binary = Problem::new(Logits::F32(&x), 2, Labels::Binary(&bits));
        for problem in [backward, binary] {
            let e = shards.evaluate(problem, &LossOptions::new()).unwrap_err();
            assert!(matches!(e, xent::Error::Unsupported { .. }), "{e}");
        }
    }
}

/// Row shards over 2, 3 and 7 paths, taken from the reference, the fast CPU path and
/// every GPU in turn (Vulkan lavapipe and GL llvmpipe here): every class-index,
/// probability, binary and float16 case of tests/data, every reduction and every way of
/// producing the gradient, against PyTorch at the tolerances of the unsharded paths.
/// Each path of each set ran.
#[test]
fn row_shards_over_every_path_match_pytorch() {
    let paths = every_path("row_shards_over_every_path_match_pytorch");
    for count in [2, 3, 7] {
        let calls: Vec<_> = (0..count).map(|_| std::sync::Arc::default()).collect();
        let shards = xent::RowShards::new(
            calls
                .iter()
                .enumerate()
                .map(|(k, c)| {
                    Box::new(Counted { inner: paths[k % paths.len()], calls: std::sync::Arc::clone(c) })
                        as Box<dyn Backend>
                })
                .collect(),
        )
        .unwrap();
        let all = [Way::Owned, Way::IntoF32, Way::InPlace, Way::Backward];
        // As the unsharded backwards: the offset cases and `everything` under sum and none
        // skip the backward's gradient comparison (8 of 180 evaluations).
        check_class_indices(&shards, |_| true, &all).at_most_skipped("class index, sharded", 1);
        check_soft(&shards, &all).at_most_skipped("probabilities, sharded", 0);
        check_binary(&shards, &all).at_most_skipped("binary, sharded", 0);
        for dir in case_dirs("float16", 2, |n| n.starts_with("half_")) {
            let NpyData::F16(bits) = npy::read(dir.join("logits.npy")).unwrap().data else {
                panic!("float16 logits")
            };
            let NpyData::I64(targets) = npy::read(dir.join("targets.npy")).unwrap().data else {
                panic!("targets")
            };
            for reduction in REDUCTIONS {
                let opts = common::case_options(&dir).reduction(reduction);
                let problem =
                    Problem::new(Logits::Half(&bits, HalfFormat::F16), classes(&dir), Labels::from(&targets));
                let got = shards.evaluate(problem.gradient(Gradient::Owned), &opts).unwrap();
                compare(&got, &expected(&dir, reduction), Tolerance::F32)
                    .unwrap_or_else(|e| panic!("{} {reduction:?} on {}: {e}", name(&dir), shards.describe()));
            }
        }
        for (k, c) in calls.iter().enumerate() {
            let n = c.load(std::sync::atomic::Ordering::Relaxed);
            assert!(n > 0, "{count} shards: shard {k} ({}) never ran", paths[k % paths.len()].describe());
        }
    }
}

/// Vocabulary-parallel evaluation (`xent::vocab`) on every path (the f64 reference, the
/// fast CPU path, every GPU's host path): every class-index case of tests/data cut into 2, 3 and 7 column ranges. Each
/// shard's partials, merged left to right and right to left, give PyTorch's loss (every
/// reduction; the row losses for `none`), and each shard's gradient columns from the
/// merged (max, sum) states put together give PyTorch's gradient — every case, the
/// offsets of 1e4 too (a saved-LSE backward cannot: `backward_floor`).
#[test]
fn vocab_shards_on_every_path_match_pytorch() {
    use xent::vocab::{ColumnShard, VocabPartial, finish};
    for path in every_path("vocab_shards_on_every_path_match_pytorch") {
        for case in cases() {
            let (n, v) = (case.targets.len(), case.classes);
            let targets = || xent::Targets::I64(&case.targets);
            for parts in [2, 3, 7] {
                let cuts: Vec<std::ops::Range<usize>> =
                    (0..parts).map(|k| v * k / parts..v * (k + 1) / parts).collect();
                let shards: Vec<Vec<f32>> = cuts
                    .iter()
                    .map(|c| case.logits.chunks(v).flat_map(|row| row[c.clone()].to_vec()).collect())
                    .collect();
                for reduction in REDUCTIONS {
                    let what =
                        format!("{}: {} {reduction:?}, {parts} column ranges", path.describe(), case.name);
                    let opts = case.opts.clone().reduction(reduction);
                    let want = expected(&case.dir, reduction);
                    let partials: Vec<Vec<VocabPartial>> = cuts
                        .iter()
                        .zip(&shards)
                        .map(|(c, l)| {
                            path.vocab_partials(ColumnShard::new(l, c.clone(), v), targets(), &opts).unwrap()
                        })
                        .collect();
                    let left: Vec<VocabPartial> = (0..n)
                        .map(|r| partials.iter().fold(VocabPartial::EMPTY, |a, p| a.combine(p[r])))
                        .collect();
                    let right: Vec<VocabPartial> = (0..n)
                        .map(|r| partials.iter().rev().fold(VocabPartial::EMPTY, |a, p| p[r].combine(a)))
                        .collect();
                    let loss_only = LossOutput { gradient: None, ..want.clone() };
                    let mut merged_states = Vec::new();
                    for merged in [&left, &right] {
                        let out = finish(merged, targets(), v, &opts).unwrap();
                        let got = LossOutput {
                            loss: out.loss,
                            row_losses: out.row_losses.filter(|_| reduction == Reduction::None),
                            ..Default::default()
                        };
                        compare(&got, &loss_only, Tolerance::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
                        merged_states = xent::vocab::states(merged);
                    }
                    let mut grad = vec![f32::NAN; n * v];
                    for (c, l) in cuts.iter().zip(&shards) {
                        let mut g = vec![f32::NAN; l.len()];
                        let shard = ColumnShard::new(l, c.clone(), v);
                        path.vocab_gradient(
                            shard,
                            targets(),
                            &merged_states,
                            Upstream::Scalar(1.0),
                            &opts,
                            &mut g,
                        )
                        .unwrap();
                        for (row, part) in grad.chunks_mut(v).zip(g.chunks(c.len().max(1))) {
                            row[c.clone()].copy_from_slice(&part[..c.len()]);
                        }
                    }
                    let got = LossOutput { gradient: Some(grad), ..Default::default() };
                    let gradient_only = LossOutput { gradient: want.gradient.clone(), ..Default::default() };
                    compare(&got, &gradient_only, Tolerance::F32)
                        .unwrap_or_else(|e| panic!("{what}: gradient: {e}"));
                }
            }
        }
    }
}

/// The whole vocabulary-parallel driver (`xent::parallel::evaluate_vocab`) on three threads
/// of an in-process group, each rank its columns on the fast CPU path, and the rows driver
/// (`evaluate_rows`), each rank its rows: PyTorch's loss and gradient on every rank, for
/// every class-index case and reduction.
#[test]
fn vocab_and_rows_over_a_local_group_match_pytorch() {
    use xent::collective::LocalGroup;
    use xent::parallel::{columns, evaluate_rows, evaluate_vocab, rows};
    use xent::vocab::ColumnShard;
    const RANKS: usize = 3;

    for case in cases() {
        let (n, v) = (case.targets.len(), case.classes);
        for reduction in REDUCTIONS {
            let opts = case.opts.clone().reduction(reduction);
            let want = expected(&case.dir, reduction);
            let group = LocalGroup::new(RANKS);
            // Each rank: (loss output by columns, its columns and their gradient, loss output by
            // rows, its rows' gradient).
            type RankResult = (LossOutput, std::ops::Range<usize>, Vec<f32>, LossOutput, Vec<f32>);
            let results: Vec<RankResult> = std::thread::scope(|s| {
                let running: Vec<_> = group
                    .iter()
                    .map(|c| {
                        let (case, opts) = (&case, &opts);
                        s.spawn(move || {
                            let cols = columns(c, v);
                            let mine: Vec<f32> =
                                case.logits.chunks(v).flat_map(|r| r[cols.clone()].to_vec()).collect();
                            let mut g = vec![f32::NAN; mine.len()];
                            let shard = ColumnShard::new(&mine, cols.clone(), v);
                            let t = xent::Targets::I64(&case.targets);
                            let by_cols =
                                evaluate_vocab(c, &xent::CpuFast, shard, t, opts, Some(&mut g)).unwrap();
                            let r = rows(c, n);
                            let mut rg = vec![f32::NAN; r.len() * v];
                            let block = Problem::new(
                                Logits::F32(&case.logits[r.start * v..r.end * v]),
                                v,
                                Labels::Classes(t.slice(r.clone())),
                            )
                            .gradient(Gradient::IntoF32(&mut rg));
                            let by_rows = evaluate_rows(c, &xent::CpuFast, block, opts).unwrap();
                            (by_cols, cols, g, by_rows, rg)
                        })
                    })
                    .collect();
                running.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let what = format!("{} {reduction:?} over {RANKS} ranks", case.name);
            let loss_only = LossOutput { gradient: None, ..want.clone() };
            let mut grad = vec![f32::NAN; n * v];
            let mut row_grad = Vec::new();
            let mut row_losses = Vec::new();
            for (by_cols, cols, g, by_rows, rg) in &results {
                let got = LossOutput {
                    loss: by_cols.loss,
                    row_losses: by_cols.row_losses.clone().filter(|_| reduction == Reduction::None),
                    ..Default::default()
                };
                compare(&got, &loss_only, Tolerance::F32)
                    .unwrap_or_else(|e| panic!("{what}, by columns: {e}"));
                for (row, part) in grad.chunks_mut(v).zip(g.chunks(cols.len().max(1))) {
                    row[cols.clone()].copy_from_slice(&part[..cols.len()]);
                }
                row_grad.extend_from_slice(rg);
                row_losses.extend(by_rows.row_losses.clone().unwrap_or_default());
                if reduction != Reduction::None {
                    let got = LossOutput { loss: by_rows.loss, ..Default::default() };
                    let want = LossOutput { loss: want.loss, ..Default::default() };
                    compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{what}, by rows: {e}"));
                }
            }
            if reduction == Reduction::None {
                let got = LossOutput { row_losses: Some(row_losses), ..Default::default() };
                compare(&got, &loss_only, Tolerance::F32).unwrap_or_else(|e| panic!("{what}, by rows: {e}"));
            }
            // Every gradient compared, the offset cases too: the shards' gradient comes
            // from the merged (max, sum) states, not from an LSE rounded to f32.
            let gradient_only = LossOutput { gradient: want.gradient.clone(), ..Default::default() };
            for (how, g) in [("columns", grad), ("rows", row_grad)] {
                let got = LossOutput { gradient: Some(g), ..Default::default() };
                compare(&got, &gradient_only, Tolerance::F32)
                    .unwrap_or_else(|e| panic!("{what}, by {how}: gradient: {e}"));
            }
        }
    }
}
