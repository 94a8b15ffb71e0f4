//! Every path against PyTorch (float64) on the committed cases in tests/data, made by
//! scripts/make_reference.py: every option and their combinations, every reduction,
//! loss and gradient.

mod common;

use std::path::{Path, PathBuf};

use xent::check::{Tolerance, compare};
use xent::npy::{self, NpyData};
use xent::{Backend, LossOptions, LossOutput, Reduction};

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

/// The options a case's folder holds: weights.npy, pos_weight.npy, and options.txt
/// (`key = value` lines).
fn options(dir: &Path) -> LossOptions {
    let mut opts = LossOptions::new();
    if dir.join("weights.npy").exists() {
        opts = opts.weights(f32s(&dir.join("weights.npy")));
    }
    if dir.join("pos_weight.npy").exists() {
        opts = opts.pos_weight(f32s(&dir.join("pos_weight.npy")));
    }
    for line in std::fs::read_to_string(dir.join("options.txt")).unwrap().lines() {
        let (key, value) = line.split_once(" = ").unwrap();
        let x: f64 = value.parse().unwrap();
        opts = match key {
            "ignore_index" => opts.ignore_index(x as i64),
            "label_smoothing" => opts.label_smoothing(x),
            "z_loss" => opts.z_loss(x),
            "softcap" => opts.softcap(x),
            "logit_scale" => opts.logit_scale(x),
            "n_items" => opts.n_items(x),
            other => panic!("unknown option {other}"),
        };
    }
    opts
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
    let kinds = ["bce_", "soft_", "half_"];
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
                opts: options(&dir),
                dir,
            }
        })
        .collect()
}

fn check_backend(backend: &dyn Backend) {
    check_backend_where(backend, |_| true);
}

fn check_backend_where(backend: &dyn Backend, include: impl Fn(&LossOptions) -> bool) {
    for case in cases().into_iter().filter(|c| include(&c.opts)) {
        for reduction in REDUCTIONS {
            let opts = case.opts.clone().reduction(reduction).gradient(true);
            let want = expected(&case.dir, reduction);
            let got = backend
                .cross_entropy(&case.logits, case.classes, (&case.targets).into(), &opts)
                .unwrap_or_else(|e| panic!("{} {reduction:?} on {}: {e}", case.name, backend.describe()));
            compare(&got, &want, Tolerance::F32)
                .unwrap_or_else(|e| panic!("{} {reduction:?} on {}: {e}", case.name, backend.describe()));
            let mut in_place = case.logits.clone();
            let got = backend
                .cross_entropy_in_place(&mut in_place, case.classes, (&case.targets).into(), &opts)
                .unwrap();
            compare(&LossOutput { gradient: Some(in_place), ..got }, &want, Tolerance::F32).unwrap_or_else(
                |e| panic!("{} {reduction:?} in place on {}: {e}", case.name, backend.describe()),
            );
        }
    }
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
        },
    ] {
        let gpu = pollster::block_on(xent::GpuContext::from_adapter_tuned(&adapter, tuning)).unwrap();
        check_backend(&gpu);
    }
}

fn check_binary(backend: &dyn Backend) {
    for dir in case_dirs("binary", 5, |n| n.starts_with("bce_")) {
        let (name, logits, targets) =
            (name(&dir), f32s(&dir.join("logits.npy")), f32s(&dir.join("targets.npy")));
        for reduction in REDUCTIONS {
            let opts = options(&dir).reduction(reduction).gradient(true);
            let got = backend
                .binary_cross_entropy(&logits, classes(&dir), &targets, &opts)
                .unwrap_or_else(|e| panic!("{name} {reduction:?} on {}: {e}", backend.describe()));
            compare(&got, &expected(&dir, reduction), Tolerance::F32)
                .unwrap_or_else(|e| panic!("{name} {reduction:?} on {}: {e}", backend.describe()));
        }
    }
}

#[test]
fn binary_cross_entropy_matches_pytorch_on_every_path() {
    check_binary(&xent::Reference);
    check_binary(&xent::CpuFast);
    for gpu in common::gpus("binary_cross_entropy_matches_pytorch") {
        check_binary(gpu);
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
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let opts = LossOptions::new().reduction(reduction).pos_weight(pos.clone()).gradient(true);
        let want = xent::cpu::reference::binary_cross_entropy(&logits, v, &targets, &opts).unwrap();
        let got = gpu.binary_cross_entropy(&logits, v, &targets, &opts).unwrap();
        compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{reduction:?}: {e}"));
    }
    // Options that do not apply are refused.
    let e =
        gpu.binary_cross_entropy(&logits, v, &targets, &LossOptions::new().label_smoothing(0.1)).unwrap_err();
    assert!(matches!(e, xent::Error::InvalidOption(_)), "{e}");
}

fn check_soft(backend: &dyn Backend) {
    // The same files as a class-index case, with float targets.
    for dir in case_dirs("soft-target", 4, |n| n.starts_with("soft_")) {
        let (name, logits, targets) =
            (name(&dir), f32s(&dir.join("logits.npy")), f32s(&dir.join("targets.npy")));
        for reduction in REDUCTIONS {
            let opts = options(&dir).reduction(reduction).gradient(true);
            let got = backend
                .cross_entropy_soft(&logits, classes(&dir), &targets, &opts)
                .unwrap_or_else(|e| panic!("{name} {reduction:?} on {}: {e}", backend.describe()));
            compare(&got, &expected(&dir, reduction), Tolerance::F32)
                .unwrap_or_else(|e| panic!("{name} {reduction:?} on {}: {e}", backend.describe()));
        }
    }
}

#[test]
fn probability_targets_match_pytorch_on_every_path() {
    check_soft(&xent::Reference);
    check_soft(&xent::CpuFast);
    for gpu in common::gpus("probability_targets_match_pytorch") {
        check_soft(gpu);
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
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let opts = LossOptions::new().reduction(reduction).label_smoothing(0.1).gradient(true).lse(true);
        let want = xent::cpu::reference::cross_entropy_soft(&logits, v, &targets, &opts).unwrap();
        let got = gpu.cross_entropy_soft(&logits, v, &targets, &opts).unwrap();
        compare(&got, &want, Tolerance::F32).unwrap_or_else(|e| panic!("{reduction:?}: {e}"));
    }
}

#[test]
fn float16_logits_match_pytorch_on_every_path() {
    let gpus = common::gpus("float16_logits_match_pytorch");
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
            let opts = options(&dir).reduction(reduction).gradient(true);
            let backends: Vec<&dyn Backend> = [&xent::Reference as &dyn Backend, &xent::CpuFast]
                .into_iter()
                .chain(gpus.iter().map(|g| g as &dyn Backend))
                .collect();
            for backend in backends {
                let got = backend
                    .cross_entropy_half(&bits, xent::HalfFormat::F16, classes, (&targets).into(), &opts)
                    .unwrap_or_else(|e| panic!("{name} {reduction:?} on {}: {e}", backend.describe()));
                compare(&got, &want, Tolerance::F32)
                    .unwrap_or_else(|e| panic!("{name} {reduction:?} on {}: {e}", backend.describe()));
            }
        }
    }
}
