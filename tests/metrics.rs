//! Evaluation metrics (shared/docs/semantics.md, "Evaluation metrics") on every path — the
//! reference, the fast CPU path and every GPU adapter — against scikit-learn / PyTorch
//! float64 results committed in tests/data/metrics_* (scripts/make_metrics_reference.py),
//! and against the f64 reference on random batches with ties, ignored rows, NaN rows and
//! masked classes, in every element type and with the gradient asked or not.
//!
//! Counts (accuracy, top-k, the counted rows, each row's prediction) must be exact; the
//! means of nll and entropy are f32 row values added in f64, so they take the loss's
//! rtol 1e-5; the ECE is a sum of |bin accuracy − bin confidence| weighted by the bin
//! shares, each confidence an f32 with rtol ~1e-6, so it takes 1e-5 absolute.

mod common;

use std::path::{Path, PathBuf};

use xent::npy::{self, NpyData};
use xent::{
    Backend, CpuFast, Error, Gradient, HalfFormat, Labels, Logits, LossOptions, LossOutput, Metrics,
    MetricsSpec, Problem, Reduction, Reference,
};

/// A committed case: inputs, options and the expected figures.
struct Case {
    name: String,
    classes: usize,
    logits: Vec<f32>,
    targets: Option<Vec<i64>>,
    probs: Option<Vec<f32>>,
    opts: LossOptions,
    expected: serde_json::Value,
}

fn number(v: &serde_json::Value) -> f64 {
    match v {
        serde_json::Value::String(s) if s == "NaN" => f64::NAN,
        v => v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")),
    }
}

fn cases() -> Vec<Case> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("metrics_"))
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 10,
        "tests/data holds {} metrics cases; run scripts/make_metrics_reference.py",
        dirs.len()
    );
    dirs.iter().map(|d| case(d)).collect()
}

fn case(dir: &Path) -> Case {
    let array = npy::read(dir.join("logits.npy")).unwrap();
    let classes = array.shape[1];
    let NpyData::F32(logits) = array.data else { panic!("{}: logits are not float32", dir.display()) };
    let targets =
        dir.join("targets.npy").exists().then(|| match npy::read(dir.join("targets.npy")).unwrap().data {
            NpyData::I64(t) => t,
            other => panic!("{other:?}"),
        });
    let probs =
        dir.join("probs.npy").exists().then(|| match npy::read(dir.join("probs.npy")).unwrap().data {
            NpyData::F32(p) => p,
            other => panic!("{other:?}"),
        });
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
    let ks: Vec<usize> =
        expected["top_k"].as_array().unwrap().iter().map(|k| k.as_u64().unwrap() as usize).collect();
    let spec =
        MetricsSpec::new().top_k(&ks).ece_bins(expected["ece_bins"].as_u64().unwrap() as usize).per_row(true);
    let mut opts = LossOptions::new().ignore_index(expected["ignore_index"].as_i64().unwrap()).metrics(spec);
    if let Some(c) = expected["softcap"].as_f64() {
        opts = opts.softcap(c);
    }
    if let Some(a) = expected["logit_scale"].as_f64() {
        opts = opts.logit_scale(a);
    }
    Case {
        name: dir.file_name().unwrap().to_string_lossy().into_owned(),
        classes,
        logits,
        targets,
        probs,
        opts,
        expected,
    }
}

fn close(got: f64, want: f64, rtol: f64, atol: f64) -> bool {
    got == want || (got.is_nan() && want.is_nan()) || (got - want).abs() <= atol + rtol * want.abs()
}

/// Checks `m` against the committed figures.
fn check_expected(m: &Metrics, e: &serde_json::Value, what: &str) {
    assert_eq!(m.counted_rows, e["counted_rows"].as_u64().unwrap(), "{what}: counted rows");
    let pred: Vec<i64> = e["pred"].as_array().unwrap().iter().map(|p| p.as_i64().unwrap()).collect();
    assert_eq!(m.predictions.as_ref().unwrap(), &pred, "{what}: predictions");
    assert!(
        close(m.accuracy, number(&e["accuracy"]), 1e-12, 0.0),
        "{what}: accuracy {} vs {}",
        m.accuracy,
        e["accuracy"]
    );
    for &(k, acc) in &m.top_k_accuracy {
        let want = number(&e["top_k_accuracy"][k.to_string()]);
        assert!(close(acc, want, 1e-12, 0.0), "{what}: top-{k} {acc} vs {want}");
    }
    for (field, got) in [("nll", m.nll), ("perplexity", m.perplexity), ("entropy", m.entropy)] {
        let want = number(&e[field]);
        assert!(close(got, want, 1e-5, 1e-6), "{what}: {field} {got} vs {want}");
    }
    assert!(close(m.ece, number(&e["ece"]), 0.0, 1e-5), "{what}: ece {} vs {}", m.ece, e["ece"]);
}

fn evaluate(path: &dyn Backend, c: &Case, gradient: bool) -> xent::Result<LossOutput> {
    let labels = match (&c.targets, &c.probs) {
        (Some(t), _) => Labels::from(t),
        (None, Some(p)) => Labels::Probabilities(p),
        _ => unreachable!(),
    };
    let mut problem = Problem::new(Logits::F32(&c.logits), c.classes, labels);
    if gradient {
        problem = problem.gradient(Gradient::Owned);
    }
    path.evaluate(problem, &c.opts)
}

/// The paths this binary checks: the reference, the fast CPU path, every adapter.
fn paths(test: &str) -> Vec<&'static dyn Backend> {
    let mut paths: Vec<&'static dyn Backend> = vec![&Reference, &CpuFast];
    paths.extend(common::gpus(test).iter().map(|g| g as &dyn Backend));
    paths
}

#[test]
fn committed_cases_on_every_path() {
    for c in cases() {
        for path in paths("committed_cases_on_every_path") {
            for gradient in [false, true] {
                let what = format!("{} on {} (gradient {gradient})", c.name, path.describe());
                let out = evaluate(path, &c, gradient).unwrap_or_else(|e| panic!("{what}: {e}"));
                check_expected(out.metrics.as_ref().expect("metrics asked"), &c.expected, &what);
            }
        }
    }
}

/// Checks `got` against the reference's metrics of the same problem: counts and every
/// prediction exact, per-row confidences to 1e-6 relative, the means as above.
fn check_against(got: &Metrics, want: &Metrics, what: &str) {
    assert_eq!(got.counted_rows, want.counted_rows, "{what}");
    assert_eq!(got.predictions, want.predictions, "{what}: predictions");
    assert_eq!(got.sums.correct, want.sums.correct, "{what}: correct");
    assert_eq!(got.sums.top_k, want.sums.top_k, "{what}: top-k counts");
    let bins = |m: &Metrics| m.sums.bins.iter().map(|b| (b.count, b.correct)).collect::<Vec<_>>();
    assert_eq!(bins(got), bins(want), "{what}: bins");
    for (field, g, w) in [("nll", got.nll, want.nll), ("entropy", got.entropy, want.entropy)] {
        assert!(close(g, w, 1e-5, 1e-6), "{what}: {field} {g} vs {w}");
    }
    assert!(close(got.ece, want.ece, 0.0, 1e-5), "{what}: ece {} vs {}", got.ece, want.ece);
    for (r, (g, w)) in
        got.confidences.as_ref().unwrap().iter().zip(want.confidences.as_ref().unwrap()).enumerate()
    {
        assert!(close(f64::from(*g), f64::from(*w), 2e-6, 0.0), "{what}: row {r} confidence {g} vs {w}");
    }
}

/// A batch with what the contract singles out: exact ties of the max (and of the target
/// with the max), ignored rows, masked (−inf) classes and, with `specials`, a NaN row, a
/// row with +inf and a row of only −inf (which make the means NaN, so both are tested).
fn tricky_batch(rows: usize, classes: usize, seed: u64, specials: bool) -> (Vec<f32>, Vec<i64>) {
    let mut logits = xent::synth::logits(rows, classes, 3.0, seed);
    let mut targets = xent::synth::targets(rows, classes, seed + 1);
    let v = classes;
    // Row 0: the max at two columns, the target at the second (not the prediction).
    logits[1] = 50.0;
    logits[v - 1] = 50.0;
    targets[0] = (v - 1) as i64;
    // Row 1: the target ties the max.
    logits[v + 2] = 40.0;
    logits[v] = 40.0;
    targets[1] = 2;
    targets[2] = -100;
    logits[4 * v + 1] = f32::NEG_INFINITY;
    logits[4 * v + v - 1] = f32::NEG_INFINITY;
    if targets[4] == 1 || targets[4] == (v - 1) as i64 {
        targets[4] = 0; // a masked target would make every mean infinite
    }
    if specials {
        logits[3 * v + v / 2] = f32::NAN;
        logits[5 * v..6 * v].fill(f32::NEG_INFINITY);
        logits[6 * v + 3] = f32::INFINITY;
    }
    targets.iter_mut().skip(9).step_by(11).for_each(|t| *t = -100);
    (logits, targets)
}

#[test]
fn random_batches_match_the_reference_on_every_path() {
    // Small rows (the cached path, several rows per workgroup), odd V (scalar loads),
    // long rows (the streaming pass), many rows.
    // Few long rows (which the contexts of this binary otherwise give the row grid).
    let shapes = [(70, 5), (67, 33), (64, 100), (80, 3000), (300, 257), (9, 9000)];
    let option_sets = [
        LossOptions::new(),
        LossOptions::new().softcap(4.0).logit_scale(1.5).label_smoothing(0.1),
        // (with class weights, below)
        LossOptions::new().reduction(Reduction::Sum).z_loss(1e-3),
    ];
    for ((seed, &(rows, v)), specials) in shapes.iter().enumerate().flat_map(|s| [(s, false), (s, true)]) {
        let (logits, targets) = tricky_batch(rows, v, 11 + seed as u64, specials);
        for (o, base) in option_sets.iter().enumerate() {
            let mut opts = base.clone();
            if o == 2 {
                opts = opts.weights((0..v).map(|c| 0.5 + (c % 3) as f32).collect());
            }
            let opts = opts.metrics(MetricsSpec::new().top_k(&[1, 2, 5]).ece_bins(10).per_row(true));
            let problem = || Problem::new(Logits::F32(&logits), v, Labels::from(&targets));
            let want = Reference.evaluate(problem(), &opts).unwrap().metrics.unwrap();
            for path in paths("random_batches_match_the_reference_on_every_path") {
                for gradient in [false, true] {
                    let what = format!(
                        "{rows}x{v}, options {o}, specials {specials}, on {} (gradient {gradient})",
                        path.describe()
                    );
                    let p = if gradient { problem().gradient(Gradient::Owned) } else { problem() };
                    let out = path.evaluate(p, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
                    check_against(out.metrics.as_ref().unwrap(), &want, &what);
                }
                // In place: the metrics come from the logits before the gradient overwrites them.
                let mut x = logits.clone();
                let p = Problem::new(Logits::F32Mut(&mut x), v, Labels::from(&targets))
                    .gradient(Gradient::InPlace);
                let out = path.evaluate(p, &opts).unwrap();
                check_against(
                    out.metrics.as_ref().unwrap(),
                    &want,
                    &format!("{rows}x{v} in place on {}", path.describe()),
                );
            }
        }
    }
}

#[test]
fn half_logits_give_the_reference_metrics() {
    let (rows, v) = (90, 130);
    // Row blocks of 7 rows, so that the front door's composition (which widens half
    // logits for the CPU paths) appends the metrics of many blocks.
    xent::set_block_elems(7 * v);
    let (raw, targets) = tricky_batch(rows, v, 5, true);
    let opts = LossOptions::new().metrics(MetricsSpec::new().per_row(true));
    for format in [HalfFormat::F16, HalfFormat::Bf16] {
        let bits: Vec<u16> = raw.iter().map(|&x| format.from_f32(x)).collect();
        let wide: Vec<f32> = bits.iter().map(|&b| format.to_f32(b)).collect();
        let want =
            Reference.evaluate(Problem::new(Logits::F32(&wide), v, Labels::from(&targets)), &opts).unwrap();
        for path in paths("half_logits_give_the_reference_metrics") {
            let out = path
                .evaluate(Problem::new(Logits::Half(&bits, format), v, Labels::from(&targets)), &opts)
                .unwrap();
            check_against(
                out.metrics.as_ref().unwrap(),
                want.metrics.as_ref().unwrap(),
                &format!("{format:?} on {}", path.describe()),
            );
        }
    }
}

#[test]
fn metrics_are_refused_where_they_do_not_apply() {
    let logits = [0.5f32, 1.0, -1.0, 2.0];
    let opts = LossOptions::new().metrics(MetricsSpec::new());
    let binary = [1.0f32, 0.0, 0.0, 1.0];
    let lse = [1.0f32, 2.0];
    for path in paths("metrics_are_refused_where_they_do_not_apply") {
        let r = path.evaluate(Problem::new(Logits::F32(&logits), 2, Labels::Binary(&binary)), &opts);
        assert!(matches!(r, Err(Error::InvalidOption(ref m)) if m.contains("metrics")), "{r:?}");
        let mut g = [0.0f32; 4];
        let p = Problem::new(Logits::F32(&logits), 2, Labels::from(&[0i64, 1]))
            .gradient(Gradient::IntoF32(&mut g))
            .backward(Some(&lse), xent::Upstream::Scalar(1.0));
        let r = path.evaluate(p, &opts);
        assert!(matches!(r, Err(Error::InvalidOption(ref m)) if m.contains("fused")), "{r:?}");
    }
    let bad = LossOptions::new().metrics(MetricsSpec::new().top_k(&[0, 1]));
    let r = Reference.evaluate(Problem::new(Logits::F32(&logits), 2, Labels::from(&[0i64, 1])), &bad);
    assert!(matches!(r, Err(Error::InvalidOption(ref m)) if m.contains("top-k")), "{r:?}");
    let r = Reference.evaluate(
        Problem::new(Logits::F32(&logits), 2, Labels::from(&[0i64, 1])),
        &LossOptions::new().metrics(MetricsSpec::new().ece_bins(0)),
    );
    assert!(matches!(r, Err(Error::InvalidOption(ref m)) if m.contains("ECE")), "{r:?}");
}

#[test]
fn probability_targets_match_the_reference_on_every_path() {
    for (seed, &(rows, v)) in [(40, 7), (33, 300), (8, 5000)].iter().enumerate() {
        let (logits, _) = tricky_batch(rows, v, 40 + seed as u64, seed == 1);
        let (probs, _) = common::dense_targets(&xent::synth::logits(rows, v, 1.0, 7 + seed as u64), v);
        for base in [LossOptions::new(), LossOptions::new().softcap(3.0).label_smoothing(0.2)] {
            let opts = base.metrics(MetricsSpec::new().top_k(&[1, 3]).ece_bins(20).per_row(true));
            let problem = || Problem::new(Logits::F32(&logits), v, Labels::Probabilities(&probs));
            let want = Reference.evaluate(problem(), &opts).unwrap().metrics.unwrap();
            assert_eq!(want.counted_rows, rows as u64, "every probability row is counted");
            for path in paths("probability_targets_match_the_reference_on_every_path") {
                for gradient in [false, true] {
                    let what =
                        format!("{rows}x{v} probabilities on {} (gradient {gradient})", path.describe());
                    let p = if gradient { problem().gradient(Gradient::Owned) } else { problem() };
                    let out = path.evaluate(p, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
                    check_against(out.metrics.as_ref().unwrap(), &want, &what);
                }
            }
        }
    }
}

#[test]
fn linear_heads_match_the_reference_on_every_path() {
    use xent::{LinearHead, Values};
    for (seed, &(rows, d, v)) in [(70, 16, 50), (130, 8, 1000), (9, 33, 3001)].iter().enumerate() {
        let h = xent::synth::logits(rows, d, 1.0, 60 + seed as u64);
        let w = xent::synth::logits(v, d, 0.5, 61 + seed as u64);
        let b = xent::synth::logits(1, v, 0.5, 62 + seed as u64);
        let mut targets = xent::synth::targets(rows, v, 63 + seed as u64);
        targets.iter_mut().step_by(5).for_each(|t| *t = -100);
        for base in [LossOptions::new(), LossOptions::new().softcap(2.0).logit_scale(0.5)] {
            let opts = base.metrics(MetricsSpec::new().top_k(&[1, 5]).per_row(true));
            let problem = || {
                let head = LinearHead::new(Values::F32(&h), Values::F32(&w), d).bias(Values::F32(&b));
                Problem::linear(head, &targets)
            };
            let want = Reference.evaluate(problem(), &opts).unwrap().metrics.unwrap();
            for path in paths("linear_heads_match_the_reference_on_every_path") {
                for gradient in [false, true] {
                    let what = format!("head {rows}x{d}x{v} on {} (gradients {gradient})", path.describe());
                    let p = if gradient { problem().gradient(Gradient::Owned) } else { problem() };
                    let out = path.evaluate(p, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
                    check_against(out.metrics.as_ref().unwrap(), &want, &what);
                }
            }
        }
    }
}

/// The device reduces the metrics per chunk, then over the chunks: under a small memory
/// budget (many chunks, several in flight) the figures are the reference's, with and
/// without the per-row outputs (which alone bring the row records back), for class
/// indices, probabilities and the linear head; repeated calls create no buffer.
#[test]
fn device_reduced_metrics_over_many_chunks_match_the_reference() {
    use xent::{LinearHead, Values};
    let (rows, v) = (700, 300);
    let (logits, targets) = tricky_batch(rows, v, 77, false);
    let (probs, _) = common::dense_targets(&xent::synth::logits(rows, v, 1.0, 78), v);
    let (d, hv) = (8, 200);
    let h = xent::synth::logits(rows, d, 1.0, 79);
    let w = xent::synth::logits(hv, d, 0.7, 80);
    let head_targets: Vec<i64> = targets.iter().map(|&t| if t < 0 { t } else { t % hv as i64 }).collect();
    let head = || LinearHead::new(Values::F32(&h), Values::F32(&w), d);
    type Make<'a> = Box<dyn Fn() -> Problem<'a> + 'a>;
    let problems: [(&str, Make<'_>); 3] = [
        ("classes", Box::new(|| Problem::new(Logits::F32(&logits), v, Labels::from(&targets)))),
        ("probabilities", Box::new(|| Problem::new(Logits::F32(&logits), v, Labels::Probabilities(&probs)))),
        ("linear head", Box::new(|| Problem::linear(head(), &head_targets))),
    ];
    for gpu in common::gpus("device_reduced_metrics_over_many_chunks_match_the_reference") {
        let mut ctx = xent::GpuContext::from_adapter_blocking(&common::adapter_of(gpu)).unwrap();
        ctx.set_memory_budget(96 << 10);
        ctx.set_chunks_in_flight(3);
        for (kind, problem) in &problems {
            for per_row in [false, true] {
                let opts = LossOptions::new()
                    .metrics(MetricsSpec::new().top_k(&[1, 3, 10]).ece_bins(40).per_row(per_row));
                let spec = MetricsSpec::new().top_k(&[1, 3, 10]).ece_bins(40);
                let want = Reference.evaluate(problem(), &opts.clone().metrics(spec.per_row(true))).unwrap();
                let want = want.metrics.unwrap();
                let what = format!("{kind} on {} (per row {per_row})", common::name(gpu));
                let got = ctx.evaluate(problem(), &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
                let got = got.metrics.unwrap();
                assert_eq!(got.predictions.is_some(), per_row, "{what}");
                if per_row {
                    check_against(&got, &want, &what);
                } else {
                    let with_rows = Metrics {
                        predictions: want.predictions.clone(),
                        confidences: want.confidences.clone(),
                        ..got
                    };
                    check_against(&with_rows, &want, &what);
                }
                let before = ctx.buffer_allocations();
                ctx.evaluate(problem(), &opts).unwrap();
                assert_eq!(ctx.buffer_allocations(), before, "{what}: a repeated call created a buffer");
            }
        }
    }
}

/// Device-resident buffers: the metrics reduced on the device from the caller's logits
/// (f32 and f16, i32 and i64 class indices, probabilities), read back after the caller's
/// submission; repeated recordings of one shape create no buffer.
/// Device-resident metrics against the reference, also on a device with 8 storage
/// buffers a stage, where f32 logits take the row grid and half logits are refused.
#[test]
fn device_resident_metrics_match_the_reference() {
    use wgpu::util::DeviceExt;
    use xent::Dtype;
    use xent::gpu::{DeviceLabels, DeviceLogits, DeviceProblem, DeviceSlice, DeviceWorkspace};
    // Whole rows, and few long rows on the row grid (these contexts turn it on).
    for (rows, v) in [(150, 260), (10, 9000)] {
        let (logits, targets) = tricky_batch(rows, v, 91, true);
        let t32: Vec<i32> = targets.iter().map(|&t| t as i32).collect();
        let (probs, _) = common::dense_targets(&xent::synth::logits(rows, v, 1.0, 92), v);
        let half: Vec<u16> = logits.iter().map(|&x| HalfFormat::F16.from_f32(x)).collect();
        let wide_half: Vec<f32> = half.iter().map(|&b| HalfFormat::F16.to_f32(b)).collect();
        let spec = MetricsSpec::new().top_k(&[1, 2, 7]).ece_bins(12).per_row(true);
        let opts = LossOptions::new().softcap(6.0).metrics(spec.clone());
        let gpus = common::gpus("device_resident_metrics_match_the_reference");
        let eights: Vec<_> = gpus.iter().map(eight_buffer_device).collect();
        for (gpu, eight) in gpus.iter().chain(&eights).zip([false, false, true, true, true, true]) {
            let buffer = |data: &[u8]| {
                gpu.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: None,
                    contents: data,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                })
            };
            let (f32_buf, f16_buf) =
                (buffer(bytemuck::cast_slice(&logits)), buffer(bytemuck::cast_slice(&half)));
            let (t32_buf, t64_buf) =
                (buffer(bytemuck::cast_slice(&t32)), buffer(bytemuck::cast_slice(&targets)));
            let probs_buf = buffer(bytemuck::cast_slice(&probs));
            let mut ws = DeviceWorkspace::new();
            for (what, dtype, labels, host) in [
                ("f32, i32", Dtype::F32, DeviceLabels::ClassesI32(DeviceSlice::from(&t32_buf)), &logits),
                ("f32, i64", Dtype::F32, DeviceLabels::ClassesI64(DeviceSlice::from(&t64_buf)), &logits),
                ("f16, i32", Dtype::F16, DeviceLabels::ClassesI32(DeviceSlice::from(&t32_buf)), &wide_half),
                (
                    "f32, probabilities",
                    Dtype::F32,
                    DeviceLabels::Probabilities(DeviceSlice::from(&probs_buf)),
                    &logits,
                ),
            ] {
                let buf = if dtype == Dtype::F32 { &f32_buf } else { &f16_buf };
                let problem = DeviceProblem {
                    logits: DeviceLogits { buffer: buf, offset: 0, dtype },
                    rows,
                    classes: v,
                    labels,
                    gradient: xent::gpu::DeviceGradient::None,
                    mode: Default::default(),
                };
                let host_labels = if matches!(labels, DeviceLabels::Probabilities(_)) {
                    Labels::Probabilities(&probs)
                } else {
                    Labels::from(&targets)
                };
                let want =
                    Reference.evaluate(Problem::new(Logits::F32(host), v, host_labels), &opts).unwrap();
                let what = format!("{what} on {} (8 storage buffers: {eight})", common::name(gpu));
                if eight && dtype == Dtype::F16 {
                    let mut enc = gpu.device().create_command_encoder(&Default::default());
                    let r = gpu.record(&mut enc, &problem, &opts, &mut ws);
                    assert!(matches!(r, Err(Error::Unsupported { .. })), "{what}: {:?}", r.err());
                    continue;
                }
                for repeat in 0..2 {
                    let before = ws.buffer_allocations();
                    let mut enc = gpu.device().create_command_encoder(&Default::default());
                    let (out, dispatches) =
                        xent::gpu::trace(|| gpu.record(&mut enc, &problem, &opts, &mut ws));
                    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
                    if eight && matches!(labels, DeviceLabels::ClassesI32(_) | DeviceLabels::ClassesI64(_)) {
                        let grid = dispatches.iter().any(|d| d.kernel.contains("row_partials"));
                        let fused = dispatches.iter().any(|d| d.kernel.contains("cross_entropy_rows"));
                        assert!(grid && !fused, "{what}: the row grid: {dispatches:?}");
                    }
                    gpu.queue().submit([enc.finish()]);
                    let got = gpu.read_device_metrics(&out).unwrap().expect("metrics asked");
                    check_against(&got, want.metrics.as_ref().unwrap(), &what);
                    if repeat == 1 {
                        assert_eq!(
                            ws.buffer_allocations(),
                            before,
                            "{what}: a repeated recording created a buffer"
                        );
                    }
                }
            }
        }
    }
}

/// Every row merge carries the metrics: the subgroup fold where one row fills the
/// workgroup (Tuning::GPU for V > 4096 on an adapter with SUBGROUP), the workgroup tree
/// (without subgroups, and for several rows a workgroup), the cached path, and workgroups
/// that take several row groups in turn; class indices and probabilities.
#[test]
fn every_row_merge_carries_the_metrics() {
    use xent::gpu::Tuning;
    let gpus = common::gpus("every_row_merge_carries_the_metrics");
    let Some(first) = gpus.first() else { return };
    let adapter = common::adapter_of(first);
    let subgroups = first.device().features().contains(wgpu::Features::SUBGROUP);
    if !subgroups {
        eprintln!(
            "SKIPPED the subgroup fold of every_row_merge_carries_the_metrics: no SUBGROUP on the first adapter"
        );
    }
    let tunings = [
        Tuning::GPU,
        Tuning { subgroups: false, ..Tuning::GPU },
        Tuning { max_workgroups: 3, ..Tuning::GPU },
        Tuning { cached_per_thread: 256, max_threads_per_row: 1024, workgroup_size: 32, ..Tuning::GPU },
        Tuning::CPU,
    ];
    let opts = LossOptions::new().logit_scale(1.25).metrics(MetricsSpec::new().top_k(&[1, 4]).per_row(true));
    for (rows, v) in [(20, 9000), (70, 600)] {
        let (logits, targets) = tricky_batch(rows, v, 123, true);
        let (probs, _) = common::dense_targets(&xent::synth::logits(rows, v, 1.0, 124), v);
        for tuning in tunings {
            let ctx = pollster::block_on(xent::GpuContext::from_adapter_tuned(&adapter, tuning)).unwrap();
            for labels in [Labels::from(&targets), Labels::Probabilities(&probs)] {
                let problem = || Problem::new(Logits::F32(&logits), v, labels);
                let want = Reference.evaluate(problem(), &opts).unwrap().metrics.unwrap();
                let what = format!("{rows}x{v} {:?} under {tuning:?}", labels.kind());
                let got = ctx.evaluate(problem(), &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
                check_against(got.metrics.as_ref().unwrap(), &want, &what);
            }
        }
    }
}

/// Logits spanning more than f32's range (−3e38 and 3e38 in one row) move the running
/// spread by a factor exp(−inf) = 0: the entropy stays the reference's (0), not NaN, in
/// the streaming and the cached passes and the merges.
#[test]
fn logits_spanning_the_f32_range_keep_the_entropy_finite() {
    for v in [5, 1024] {
        let rows = 66;
        let mut logits = vec![-3.0e38f32; rows * v];
        for r in 0..rows {
            logits[r * v + (r * 7) % v] = 3.0e38;
        }
        let targets: Vec<i64> = (0..rows).map(|r| ((r * 7) % v) as i64).collect();
        let opts = LossOptions::new().metrics(MetricsSpec::new().per_row(true));
        let problem = || Problem::new(Logits::F32(&logits), v, Labels::from(&targets));
        let want = Reference.evaluate(problem(), &opts).unwrap().metrics.unwrap();
        assert_eq!((want.accuracy, want.entropy), (1.0, 0.0));
        for path in paths("logits_spanning_the_f32_range_keep_the_entropy_finite") {
            let got = path.evaluate(problem(), &opts).unwrap().metrics.unwrap();
            check_against(&got, &want, &format!("V {v} on {}", path.describe()));
        }
    }
}

/// Rows longer than one binding (a 64 KiB binding: a row of 40000 f32 in three pieces)
/// and the row grid (few long rows on the device with the grid on) carry the metrics in
/// their partial states: the target's piece goes first, so the other pieces count above
/// its logit; the merge writes each row's record.
#[test]
fn split_rows_and_the_row_grid_carry_the_metrics() {
    let gpus = common::gpus("split_rows_and_the_row_grid_carry_the_metrics");
    let opts = LossOptions::new().softcap(8.0).metrics(MetricsSpec::new().top_k(&[1, 3, 100]).per_row(true));
    let check = |gpu: &xent::GpuContext, rows: usize, v: usize, what: &str| {
        let (logits, mut targets) = tricky_batch(rows, v, 7 + v as u64, rows > 6);
        // Targets in every piece, the first, the last.
        targets[3] = 0;
        targets[4] = (v - 1) as i64;
        let problem = || Problem::new(Logits::F32(&logits), v, Labels::from(&targets));
        let want = Reference.evaluate(problem(), &opts).unwrap().metrics.unwrap();
        for gradient in [false, true] {
            let p = if gradient { problem().gradient(Gradient::Owned) } else { problem() };
            let what = format!("{what} {rows}x{v} on {} (gradient {gradient})", common::name(gpu));
            let out = gpu.evaluate(p, &opts).unwrap_or_else(|e| panic!("{what}: {e}"));
            check_against(out.metrics.as_ref().unwrap(), &want, &what);
        }
    };
    if let Some(tiny) = common::tiny_device(gpus) {
        let plan = xent::gpu::Plan::new(5, 40000, xent::gpu::GradKind::None, &tiny.plan_limits()).unwrap();
        assert!(matches!(plan.layout, xent::gpu::Layout::Split { .. }), "{plan:?}");
        check(&tiny, 7, 40000, "split rows");
    }
    for gpu in gpus {
        let plan = xent::gpu::Plan::new(12, 10000, xent::gpu::GradKind::None, &gpu.plan_limits()).unwrap();
        assert!(matches!(plan.layout, xent::gpu::Layout::Rows { blocks_per_row: Some(_), .. }), "{plan:?}");
        check(gpu, 12, 10000, "row grid");
    }
}

/// On a device with WebGPU's default 8 storage buffers a stage (no binding for the fused
/// kernel's records), f32 logits take their metrics from the row grid, with every option
/// and the gradient, short rows and long; probability targets keep their kernel (its
/// records fit the 8); half logits are a typed `Unsupported`.
#[test]
fn eight_storage_buffer_devices_take_the_metrics_on_the_row_grid() {
    use xent::gpu::trace;
    let gpus = common::gpus("eight_storage_buffer_devices_take_the_metrics_on_the_row_grid");
    let weights = |v: usize| (0..v).map(|c| 0.5 + (c % 4) as f32 * 0.3).collect::<Vec<f32>>();
    for (seed, &(rows, v)) in [(300, 37), (12, 9000)].iter().enumerate() {
        let (logits, targets) = tricky_batch(rows, v, 120 + seed as u64, false);
        let (probs, _) = common::dense_targets(&xent::synth::logits(rows, v, 1.0, 130 + seed as u64), v);
        let spec = MetricsSpec::new().top_k(&[1, 3]).ece_bins(10).per_row(true);
        for base in [
            LossOptions::new(),
            LossOptions::new()
                .weights(weights(v))
                .label_smoothing(0.1)
                .softcap(4.0)
                .z_loss(1e-3)
                .logit_scale(0.8),
        ] {
            let opts = base.metrics(spec.clone());
            let problem = |kind: &str| {
                let labels =
                    if kind == "classes" { Labels::from(&targets) } else { Labels::Probabilities(&probs) };
                Problem::new(Logits::F32(&logits), v, labels)
            };
            for gpu in gpus {
                let eight = eight_buffer_device(gpu);
                for kind in ["classes", "probabilities"] {
                    let problem = || problem(kind);
                    let want = Reference.evaluate(problem().gradient(Gradient::Owned), &opts).unwrap();
                    for gradient in [false, true] {
                        let what =
                            format!("{rows}x{v} {kind} on {} (gradient {gradient})", common::name(gpu));
                        let p = if gradient { problem().gradient(Gradient::Owned) } else { problem() };
                        let (out, dispatches) = trace(|| eight.evaluate(p, &opts));
                        let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
                        check_against(out.metrics.as_ref().unwrap(), want.metrics.as_ref().unwrap(), &what);
                        let (l, w) = (out.loss.unwrap(), want.loss.unwrap());
                        assert!(l == w || (l - w).abs() <= 1e-5 * w.abs() + 1e-6, "{what}: loss {l} vs {w}");
                        if gradient {
                            let (g, wg) = (out.gradient.as_ref().unwrap(), want.gradient.as_ref().unwrap());
                            let bad = g.iter().zip(wg).position(|(a, b)| !(a == b || (a - b).abs() <= 1e-6));
                            assert!(bad.is_none(), "{what}: gradient element {bad:?}");
                        }
                        let ran = |k: &str| dispatches.iter().any(|d| d.kernel.contains(k));
                        if kind == "classes" {
                            assert!(
                                ran("row_partials") && !ran("cross_entropy_rows"),
                                "{what}: {dispatches:?}"
                            );
                        }
                    }
                }
            }
        }
    }
    let half: Vec<u16> = [0.5f32, 1.0, -1.0, 2.0].iter().map(|&x| HalfFormat::F16.from_f32(x)).collect();
    for gpu in gpus {
        let eight = eight_buffer_device(gpu);
        let p = Problem::new(Logits::Half(&half, HalfFormat::F16), 2, Labels::from(&[0i64, 1]));
        let r = eight.evaluate(p, &LossOptions::new().metrics(MetricsSpec::new()));
        assert!(matches!(r, Err(Error::Unsupported { ref why, .. }) if why.contains("8 storage")), "{r:?}");
    }
}

/// A device on `gpu`'s adapter with WebGPU's default 8 storage buffers a shader stage
/// (the fused kernel's record binding is a ninth).
fn eight_buffer_device(gpu: &xent::gpu::GpuContext) -> xent::gpu::GpuContext {
    let adapter = common::adapter_of(gpu);
    let mut limits = adapter.limits();
    limits.max_storage_buffers_per_shader_stage = 8;
    let (device, queue) = pollster::block_on(
        adapter.request_device(&wgpu::DeviceDescriptor { required_limits: limits, ..Default::default() }),
    )
    .unwrap();
    xent::gpu::GpuContext::from_device_tuned(device, queue, gpu.tuning()).unwrap()
}

/// The linear head's metrics come from the `partials` tiles (no logits buffer): each
/// row's target logit first (`head_target`), the tiles' counts above it, then the merge
/// writes the records. The loss alone, and the loss with gradients on the recompute path
/// (a device with 8 storage buffers a stage, where the fused kernel has no record
/// binding); classes duplicated in W and b give exact ties of the max and of the target
/// with another class, which must count as the reference counts them (a tie is not
/// above), with scalar and vec4 loads.
#[test]
fn linear_head_metrics_come_from_the_partials_tiles() {
    use xent::gpu::trace;
    use xent::{LinearHead, Values};
    let gpus = common::gpus("linear_head_metrics_come_from_the_partials_tiles");
    for (seed, &(rows, d, v)) in [(90, 7, 600), (40, 16, 2500)].iter().enumerate() {
        let h = xent::synth::logits(rows, d, 1.0, 80 + seed as u64);
        let mut w = xent::synth::logits(v, d, 0.5, 81 + seed as u64);
        let mut b = xent::synth::logits(1, v, 0.5, 82 + seed as u64);
        // Class c duplicates class c − 1 for c ≡ 1 (mod 3).
        for c in (1..v).filter(|c| c % 3 == 1) {
            w.copy_within((c - 1) * d..c * d, c * d);
            b[c] = b[c - 1];
        }
        let mut targets = xent::synth::targets(rows, v, 83 + seed as u64);
        // Some targets on a duplicated class (tied with the class before it).
        targets.iter_mut().skip(3).step_by(5).for_each(|t| *t = 1 + 3 * (*t / 3).min((v as i64 - 2) / 3));
        targets.iter_mut().step_by(7).for_each(|t| *t = -100);
        for base in
            [LossOptions::new(), LossOptions::new().softcap(2.0).logit_scale(0.5).label_smoothing(0.1)]
        {
            let opts = base.metrics(MetricsSpec::new().top_k(&[1, 2, 5]).per_row(true));
            let problem = || {
                let head = LinearHead::new(Values::F32(&h), Values::F32(&w), d).bias(Values::F32(&b));
                Problem::linear(head, &targets)
            };
            let want = Reference.evaluate(problem(), &opts).unwrap().metrics.unwrap();
            assert!(want.sums.top_k[0] < want.sums.top_k[1], "ties make top-2 differ from top-1");
            for gpu in gpus {
                let eight = eight_buffer_device(gpu);
                for (ctx, gradient) in [(gpu, false), (&eight, false), (&eight, true)] {
                    let what = format!("head {rows}x{d}x{v} on {} (gradients {gradient})", common::name(ctx));
                    let p = if gradient { problem().gradient(Gradient::Owned) } else { problem() };
                    let (out, dispatches) = trace(|| ctx.evaluate(p, &opts));
                    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
                    check_against(out.metrics.as_ref().unwrap(), &want, &what);
                    let count =
                        |needle: &str| dispatches.iter().filter(|d| d.kernel.contains(needle)).count();
                    assert!(count("head_target") >= 1, "{what}: {dispatches:?}");
                    assert_eq!(count("head_target"), count("merge_partials"), "{what}: once a chunk");
                    assert!(
                        count(") partials") >= 1 && count("cross_entropy_rows") == 0,
                        "{what}: {dispatches:?}"
                    );
                    assert_eq!(count(") grad") > 0, gradient, "{what}: G recomputed with the gradients");
                }
            }
        }
    }
}
