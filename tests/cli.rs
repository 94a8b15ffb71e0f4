//! The `xent` binary as users drive it: `eval` output, files, exit codes.

mod common;

use common::cli::{Dir, xent};

use std::path::Path;
use std::process::Command;

use xent::npy::{self, NpyData};
use xent::{Backend, BackendExt, Gradient, Labels, LossOptions, Problem, Reduction, Reference, synth};

fn json_field<'a>(json: &'a str, key: &str) -> &'a str {
    let at = json.find(&format!("\"{key}\": ")).unwrap_or_else(|| panic!("{key} in {json}")) + key.len() + 4;
    json[at..].split([',', '}']).next().unwrap().trim()
}

fn f32s(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let a = npy::read(path).unwrap();
    match a.data {
        NpyData::F32(v) => (a.shape, v),
        other => panic!("{other:?}"),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A float16 .npy written by hand: the header, then the raw bits.
fn write_f16(path: &Path, shape: [usize; 2], bits: &[u16]) {
    let [n, v] = shape;
    let dict = format!("{{'descr': '<f2', 'fortran_order': False, 'shape': ({n}, {v}), }}");
    let pad = (64 - (10 + dict.len() + 1) % 64) % 64;
    let header = format!("{dict}{}\n", " ".repeat(pad));
    let mut file = b"\x93NUMPY\x01\x00".to_vec();
    file.extend_from_slice(&(header.len() as u16).to_le_bytes());
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(bytemuck::cast_slice(bits));
    std::fs::write(path, file).unwrap();
}

/// float16 logits [n, v] (bits, and their values widened to f32).
fn f16_logits(n: usize, v: usize, seed: u64) -> (Vec<u16>, Vec<f32>) {
    let format = xent::HalfFormat::F16;
    let bits: Vec<u16> = synth::logits(n, v, 3.0, seed).iter().map(|&x| format.from_f32(x)).collect();
    let wide = bits.iter().map(|&h| format.to_f32(h)).collect();
    (bits, wide)
}

/// Probability targets [n, v]: each row's |x| normalised.
fn probabilities(n: usize, v: usize, seed: u64) -> Vec<f32> {
    synth::logits(n, v, 1.0, seed)
        .chunks(v)
        .flat_map(|r| {
            let s: f32 = r.iter().map(|x| x.abs()).sum();
            r.iter().map(move |x| x.abs() / s).collect::<Vec<_>>()
        })
        .collect()
}

/// Binary targets [n, v] in {0, 1}.
fn binary_targets(n: usize, v: usize, seed: u64) -> Vec<f32> {
    synth::logits(n, v, 1.0, seed).iter().map(|x| if *x > 0.3 { 1.0 } else { 0.0 }).collect()
}

/// The reference's loss (row losses for `none`) and owned gradient of `problem`.
fn reference(problem: Problem<'_>, opts: &LossOptions) -> xent::LossOutput {
    Reference.evaluate(problem.gradient(Gradient::Owned), opts).unwrap()
}

/// The devices `eval` runs on: the GPU when there is an adapter (`common::gpus` fails the
/// test when there is none, unless the user opted out), the fast CPU path, the reference.
fn devices(test: &str) -> &'static [&'static str] {
    if common::gpus(test).is_empty() { &["cpu", "reference"] } else { &["gpu", "cpu", "reference"] }
}

/// What one successful `xent eval` printed and wrote.
struct Eval {
    stdout: String,
    /// Shape and values of `--out-loss` and `--out-grad`.
    loss: (Vec<usize>, Vec<f32>),
    grad: (Vec<usize>, Vec<f32>),
}

impl Eval {
    /// `loss` as the reduced loss, or the per-row (per-element) losses for
    /// `Reduction::None`, with the gradient.
    fn output(&self, reduction: Reduction) -> xent::LossOutput {
        let (loss, gradient) = (self.loss.1.clone(), Some(self.grad.1.clone()));
        match reduction {
            Reduction::None => xent::LossOutput { row_losses: Some(loss), gradient, ..Default::default() },
            _ => {
                assert!(self.loss.0.is_empty(), "reduced loss of shape {:?}", self.loss.0);
                xent::LossOutput { loss: Some(loss[0]), gradient, ..Default::default() }
            }
        }
    }
}

/// `xent eval ARGS --device DEVICE`, writing the loss and gradient into `dir`; a failed
/// run fails the test with its message.
fn eval(dir: &Dir, device: &str, args: &[&str]) -> Eval {
    let (lo, go) = (dir.path("loss.npy"), dir.path("grad.npy"));
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    all.extend(["--device", device, "--out-loss", s(&lo), "--out-grad", s(&go)]);
    let (code, stdout, stderr) = xent(&all);
    assert_eq!(code, 0, "{device}: {stderr}");
    Eval { stdout, loss: f32s(&lo), grad: f32s(&go) }
}

#[test]
fn eval_matches_the_reference_on_every_device_and_reduction() {
    let dir = Dir::new("eval");
    let (n, v) = (50, 301);
    let logits = synth::logits(n, v, 2.0, 21);
    let mut targets = synth::targets(n, v, 21);
    targets[4] = -100;
    let (l, t) = (dir.path("l.npy"), dir.path("t.npy"));
    npy::write_f32(&l, &[n, v], &logits).unwrap();
    npy::write_i64(&t, &targets).unwrap();
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let opts = LossOptions::new().reduction(reduction);
        let mut want = reference(Problem::new(&logits, v, &targets).row_losses(true), &opts);
        if reduction != Reduction::None {
            want.row_losses = None;
        }
        for device in devices("eval_matches_the_reference") {
            let args = ["--logits", s(&l), "--targets", s(&t), "--reduction", reduction.name()];
            let run = eval(&dir, device, &args);
            assert_eq!(json_field(&run.stdout, "rows"), n.to_string());
            assert_eq!(json_field(&run.stdout, "classes"), v.to_string());
            assert_eq!(json_field(&run.stdout, "device"), format!("\"{device}\""));
            // No z-loss: its part is null.
            assert_eq!(json_field(&run.stdout, "z_loss"), "null");
            let elapsed: f64 = json_field(&run.stdout, "elapsed_ms").parse().unwrap();
            assert!(elapsed >= 0.0);
            assert_eq!(run.grad.0, vec![n, v]);
            let got = run.output(reduction);
            match reduction {
                Reduction::None => {
                    assert_eq!(run.loss.0, vec![n]);
                    assert_eq!(json_field(&run.stdout, "loss"), "null");
                }
                _ => {
                    let printed: f32 = json_field(&run.stdout, "loss").parse().unwrap();
                    assert_eq!(printed, run.loss.1[0]);
                }
            }
            xent::check::compare(&got, &want, xent::check::Tolerance::F32)
                .unwrap_or_else(|e| panic!("{device} {reduction:?}: {e}"));
        }
    }
}

/// `--device gpu --adapter all`: the rows shared by every adapter (lavapipe and GL
/// llvmpipe here); the JSON names them all, the loss and gradient equal the reference's.
#[test]
fn eval_over_every_adapter_shares_the_rows() {
    let gpus = common::gpus("eval_over_every_adapter_shares_the_rows");
    if gpus.is_empty() {
        return;
    }
    let dir = Dir::new("eval-all");
    let (n, v) = (37, 203);
    let logits = synth::logits(n, v, 2.0, 23);
    let mut targets = synth::targets(n, v, 23);
    targets[3] = -100;
    let (l, t) = (dir.path("l.npy"), dir.path("t.npy"));
    npy::write_f32(&l, &[n, v], &logits).unwrap();
    npy::write_i64(&t, &targets).unwrap();
    let opts = LossOptions::new().label_smoothing(0.1);
    let want = reference(Problem::new(&logits, v, &targets), &opts);
    let args = ["--logits", s(&l), "--targets", s(&t), "--label-smoothing", "0.1", "--adapter", "all"];
    let run = eval(&dir, "gpu", &args);
    // (The adapter's text holds commas: read it from the whole line.)
    let out = &run.stdout;
    assert!(out.contains(&format!("\"adapter\": \"rows over {} paths: ", gpus.len())), "{out}");
    for g in gpus {
        let name = format!("{} ({:?})", g.adapter_info().name, g.adapter_info().backend);
        assert!(out.contains(&name), "{out} names {name}");
    }
    xent::check::compare(&run.output(Reduction::Mean), &want, xent::check::Tolerance::F32)
        .unwrap_or_else(|e| panic!("--adapter all: {e}"));
}

#[test]
fn eval_takes_every_option() {
    let dir = Dir::new("options");
    let (n, v) = (40, 97);
    let logits = synth::logits(n, v, 2.0, 23);
    let mut targets = synth::targets(n, v, 23);
    targets[3] = 5;
    let weights: Vec<f32> = (0..v).map(|c| 0.5 + (c % 7) as f32 / 4.0).collect();
    let (l, t, w) = (dir.path("l.npy"), dir.path("t.npy"), dir.path("w.npy"));
    npy::write_f32(&l, &[n, v], &logits).unwrap();
    npy::write_i64(&t, &targets).unwrap();
    npy::write_f32(&w, &[v], &weights).unwrap();
    let opts = LossOptions::new()
        .ignore_index(5)
        .weights(weights)
        .label_smoothing(0.1)
        .z_loss(1e-3)
        .softcap(15.0)
        .logit_scale(0.8)
        .n_items(50.0);
    let want = Reference.cross_entropy_with_grad(&logits, v, &targets, &opts).unwrap();
    let want_z = want.z_loss.expect("the reference's z-loss part") as f64;
    for device in devices("eval_takes_every_option") {
        #[rustfmt::skip]
        let args = [
            "--logits", s(&l), "--targets", s(&t), "--weights", s(&w), "--ignore-index", "5",
            "--label-smoothing", "0.1", "--z-loss", "1e-3", "--softcap", "15", "--logit-scale", "0.8",
            "--n-items", "50",
        ];
        let run = eval(&dir, device, &args);
        let got = run.output(Reduction::Mean);
        xent::check::compare(&got, &want, xent::check::Tolerance::F32)
            .unwrap_or_else(|e| panic!("{device}: {e}"));
        assert_eq!(json_field(&run.stdout, "loss").parse::<f32>().unwrap(), got.loss.unwrap());
        // The z-loss part (divided by n_items), under the loss tolerance.
        let z: f64 = json_field(&run.stdout, "z_loss").parse().unwrap();
        let tol = xent::check::Tolerance::F32;
        assert!(
            (z - want_z).abs() <= tol.loss_rtol * want_z.abs() + tol.loss_atol,
            "{device}: z_loss {z}, want {want_z}"
        );
    }
}

#[test]
fn eval_probability_targets() {
    let dir = Dir::new("soft");
    let (n, v) = (25, 19);
    let logits = synth::logits(n, v, 2.0, 41);
    let probs = probabilities(n, v, 42);
    let (l, t) = (dir.path("l.npy"), dir.path("t.npy"));
    npy::write_f32(&l, &[n, v], &logits).unwrap();
    npy::write_f32(&t, &[n, v], &probs).unwrap();
    let opts = LossOptions::new().label_smoothing(0.2);
    let want = reference(Problem::new(&logits, v, Labels::Probabilities(&probs)), &opts);
    for device in devices("eval_probability_targets") {
        let run = eval(&dir, device, &["--logits", s(&l), "--targets", s(&t), "--label-smoothing", "0.2"]);
        xent::check::compare(&run.output(Reduction::Mean), &want, xent::check::Tolerance::F32)
            .unwrap_or_else(|e| panic!("{device}: {e}"));
    }
}

#[test]
fn eval_float16_logits() {
    let dir = Dir::new("f16");
    let (n, v) = (20, 64);
    let (bits, wide) = f16_logits(n, v, 51);
    let targets = synth::targets(n, v, 51);
    let (l, t) = (dir.path("l.npy"), dir.path("t.npy"));
    write_f16(&l, [n, v], &bits);
    npy::write_i64(&t, &targets).unwrap();
    let want = Reference.cross_entropy_with_grad(&wide, v, &targets, &LossOptions::new()).unwrap();
    for device in devices("eval_float16_logits") {
        let run = eval(&dir, device, &["--logits", s(&l), "--targets", s(&t)]);
        xent::check::compare(&run.output(Reduction::Mean), &want, xent::check::Tolerance::F32)
            .unwrap_or_else(|e| panic!("{device}: {e}"));
    }
}

#[test]
fn eval_binary_cross_entropy() {
    let dir = Dir::new("bce");
    let (n, v) = (30, 11);
    let logits = synth::logits(n, v, 3.0, 31);
    let targets = binary_targets(n, v, 32);
    let pos: Vec<f32> = (0..v).map(|c| 1.0 + c as f32 / 4.0).collect();
    let (l, t, p) = (dir.path("l.npy"), dir.path("t.npy"), dir.path("p.npy"));
    npy::write_f32(&l, &[n, v], &logits).unwrap();
    npy::write_f32(&t, &[n, v], &targets).unwrap();
    npy::write_f32(&p, &[v], &pos).unwrap();
    for reduction in [Reduction::Mean, Reduction::None] {
        let opts = LossOptions::new().reduction(reduction).pos_weight(pos.clone());
        let want = reference(Problem::new(&logits, v, Labels::Binary(&targets)), &opts);
        for device in devices("eval_binary_cross_entropy") {
            #[rustfmt::skip]
            let args = [
                "--loss-kind", "bce", "--logits", s(&l), "--targets", s(&t), "--pos-weight", s(&p),
                "--reduction", reduction.name(),
            ];
            let run = eval(&dir, device, &args);
            if reduction == Reduction::None {
                assert_eq!(run.loss.0, vec![n, v]);
            }
            xent::check::compare(&run.output(reduction), &want, xent::check::Tolerance::F32)
                .unwrap_or_else(|e| panic!("{device}: {e}"));
        }
    }
}

#[test]
fn eval_float16_logits_with_probability_targets() {
    // float16 logits (an odd number of classes) with float32 probability targets, against
    // the reference on the widened values.
    let dir = Dir::new("f16-soft");
    let (n, v) = (23, 19);
    let (bits, wide) = f16_logits(n, v, 71);
    let probs = probabilities(n, v, 72);
    let (l, t) = (dir.path("l.npy"), dir.path("t.npy"));
    write_f16(&l, [n, v], &bits);
    npy::write_f32(&t, &[n, v], &probs).unwrap();
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let opts = LossOptions::new().reduction(reduction).label_smoothing(0.1);
        let want = reference(Problem::new(&wide, v, Labels::Probabilities(&probs)), &opts);
        for device in devices("eval_float16_logits_with_probability_targets") {
            #[rustfmt::skip]
            let args = [
                "--logits", s(&l), "--targets", s(&t), "--label-smoothing", "0.1", "--reduction", reduction.name(),
            ];
            let run = eval(&dir, device, &args);
            assert_eq!(run.grad.0, vec![n, v]);
            if reduction == Reduction::None {
                assert_eq!(run.loss.0, vec![n]);
            }
            xent::check::compare(&run.output(reduction), &want, xent::check::Tolerance::F32)
                .unwrap_or_else(|e| panic!("{device} {reduction:?}: {e}"));
        }
    }
}

#[test]
fn eval_float16_logits_with_binary_cross_entropy() {
    // float16 logits (an odd number of classes) under `--loss-kind bce`, against the
    // reference on the widened values.
    let dir = Dir::new("f16-bce");
    let (n, v) = (29, 11);
    let (bits, wide) = f16_logits(n, v, 73);
    let targets = binary_targets(n, v, 74);
    let pos: Vec<f32> = (0..v).map(|c| 0.5 + c as f32 / 3.0).collect();
    let (l, t, p) = (dir.path("l.npy"), dir.path("t.npy"), dir.path("p.npy"));
    write_f16(&l, [n, v], &bits);
    npy::write_f32(&t, &[n, v], &targets).unwrap();
    npy::write_f32(&p, &[v], &pos).unwrap();
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let opts = LossOptions::new().reduction(reduction).pos_weight(pos.clone());
        let want = reference(Problem::new(&wide, v, Labels::Binary(&targets)), &opts);
        for device in devices("eval_float16_logits_with_binary_cross_entropy") {
            #[rustfmt::skip]
            let args = [
                "--loss-kind", "bce", "--logits", s(&l), "--targets", s(&t), "--pos-weight", s(&p),
                "--reduction", reduction.name(),
            ];
            let run = eval(&dir, device, &args);
            assert_eq!(run.grad.0, vec![n, v]);
            if reduction == Reduction::None {
                assert_eq!(run.loss.0, vec![n, v]);
            }
            xent::check::compare(&run.output(reduction), &want, xent::check::Tolerance::F32)
                .unwrap_or_else(|e| panic!("{device} {reduction:?}: {e}"));
        }
    }
}

#[test]
fn eval_accepts_negative_and_zero_class_weights() {
    // Class weights may be negative or zero (only NaN and infinities are refused).
    let dir = Dir::new("neg-weights");
    let (n, v) = (30, 13);
    let logits = synth::logits(n, v, 2.0, 75);
    let targets = synth::targets(n, v, 75);
    let weights: Vec<f32> = (0..v).map(|c| [1.0, -0.5, 0.0, 2.0][c % 4]).collect();
    let (l, t, w) = (dir.path("l.npy"), dir.path("t.npy"), dir.path("w.npy"));
    npy::write_f32(&l, &[n, v], &logits).unwrap();
    npy::write_i64(&t, &targets).unwrap();
    npy::write_f32(&w, &[v], &weights).unwrap();
    for reduction in [Reduction::Sum, Reduction::None] {
        let opts = LossOptions::new().reduction(reduction).weights(weights.clone());
        let want = Reference.cross_entropy_with_grad(&logits, v, &targets, &opts).unwrap();
        for device in devices("eval_accepts_negative_and_zero_class_weights") {
            let args =
                ["--logits", s(&l), "--targets", s(&t), "--weights", s(&w), "--reduction", reduction.name()];
            let run = eval(&dir, device, &args);
            xent::check::compare(&run.output(reduction), &want, xent::check::Tolerance::F32)
                .unwrap_or_else(|e| panic!("{device} {reduction:?}: {e}"));
        }
    }
}

#[test]
fn bad_input_exits_2_with_a_message_and_writes_nothing() {
    let dir = Dir::new("bad");
    let (l, t, out) = (dir.path("l.npy"), dir.path("t.npy"), dir.path("out.npy"));
    npy::write_f32(&l, &[3, 4], &synth::logits(3, 4, 1.0, 1)).unwrap();
    let bad_t = dir.path("bad_t.npy");
    npy::write_i64(&bad_t, &[0, 7, 1]).unwrap();
    npy::write_i64(&t, &[0, 1, 2]).unwrap();
    let short_t = dir.path("short_t.npy");
    npy::write_i64(&short_t, &[0, 1]).unwrap();
    let garbage = dir.path("garbage.npy");
    std::fs::write(&garbage, b"not an npy file at all").unwrap();
    let missing = dir.path("missing.npy");
    // Negative and zero class weights are accepted (`eval_accepts_negative_and_zero_class_weights`);
    // only NaN and infinities are refused.
    let (short_w, nan_w, inf_w) = (dir.path("short_w.npy"), dir.path("nan_w.npy"), dir.path("inf_w.npy"));
    npy::write_f32(&short_w, &[3], &[1.0, 1.0, 1.0]).unwrap();
    npy::write_f32(&nan_w, &[4], &[1.0, f32::NAN, 1.0, 1.0]).unwrap();
    npy::write_f32(&inf_w, &[4], &[1.0, 1.0, f32::INFINITY, 1.0]).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--targets", s(&bad_t)], "row 1: 7"),
        (vec!["--targets", s(&short_t)], "rows"),
        (vec!["--targets", s(&garbage)], "magic"),
        (vec!["--targets", s(&missing)], "missing.npy"),
        (vec!["--targets", s(&t), "--reduction", "avg"], "avg"),
        (vec!["--targets", s(&t), "--label-smoothing", "1.5"], "label smoothing must be in [0, 1], got 1.5"),
        (vec!["--targets", s(&t), "--loss-kind", "bce"], "binary targets must be float32 [N, V]"),
        (
            vec!["--targets", s(&t), "--pos-weight", s(&short_w)],
            "--pos-weight applies to --loss-kind bce only",
        ),
        (vec!["--targets", s(&t), "--z-loss", "-1"], "z-loss"),
        (vec!["--targets", s(&t), "--softcap", "0"], "softcap"),
        (vec!["--targets", s(&t), "--n-items", "0"], "n_items"),
        (vec!["--targets", s(&t), "--weights", s(&short_w)], "has 3 elements, expected 4"),
        (vec!["--targets", s(&t), "--weights", s(&nan_w)], "weights[1] is NaN"),
        (vec!["--targets", s(&t), "--weights", s(&inf_w)], "weights[2] is inf"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["eval", "--logits", s(&l), "--device", "reference", "--out-loss", s(&out)];
        args.extend(extra);
        let (code, stdout, stderr) = xent(&args);
        assert_eq!(code, 2, "{args:?}: {stdout} {stderr}");
        assert!(stderr.contains(needle), "{args:?}: '{needle}' not in {stderr}");
        assert!(!out.exists(), "{args:?} left an output file");
        assert!(
            std::fs::read_dir(&dir.0)
                .unwrap()
                .all(|e| { !e.unwrap().file_name().to_string_lossy().contains("xent-tmp") })
        );
    }
    // Logits of the wrong dtype and rank.
    npy::write_i64(dir.path("int_logits.npy"), &[1, 2, 3]).unwrap();
    let (code, _, stderr) = xent(&[
        "eval",
        "--logits",
        s(&dir.path("int_logits.npy")),
        "--targets",
        s(&t),
        "--device",
        "reference",
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("2-D"), "{stderr}");
    // An output path in a directory that does not exist fails before any work.
    let nowhere = dir.path("no/such/dir/loss.npy");
    let (code, _, stderr) = xent(&[
        "eval",
        "--logits",
        s(&l),
        "--targets",
        s(&t),
        "--device",
        "reference",
        "--out-loss",
        s(&nowhere),
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no/such/dir"), "{stderr}");
}

#[test]
fn info_and_check_run_on_the_machine() {
    if common::gpus("info_and_check_run_on_the_machine").is_empty() {
        return;
    }
    let (code, stdout, stderr) = xent(&["info"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("max_storage_buffer_binding_size"), "{stdout}");
    assert!(stdout.contains("kernel tuning: XENT_WORKGROUP_SIZE="), "{stdout}");
    let (code, stdout, stderr) = xent(&["check"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("all passed"), "{stdout}");
}

#[test]
fn bench_json_has_the_fixed_fields() {
    // A small shape on every device: the JSON array the issue fixes, with real timings.
    let gpu = !common::gpus("bench_json_has_the_fixed_fields").is_empty();
    let device = if gpu { "all" } else { "cpu" };
    let (code, stdout, stderr) =
        xent(&["bench", "--device", device, "--rows", "16", "--classes", "1000", "--iters", "2", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let devices: Vec<&str> = rows.iter().map(|r| r["device"].as_str().unwrap()).collect();
    let want_rows = if gpu { 4 } else { 2 };
    assert_eq!(rows.len(), want_rows, "{stdout}");
    assert_eq!(devices.iter().filter(|&&d| d == "cpu").count(), 2, "{stdout}");
    for r in &rows {
        assert_eq!(r["rows"], 16);
        assert_eq!(r["classes"], 1000);
        assert!(["forward", "forward-backward"].contains(&r["pass"].as_str().unwrap()), "{r}");
        assert!(r["adapter"].as_str().is_some_and(|a| !a.is_empty()), "{r}");
        let (median, min) = (r["median_ms"].as_f64().unwrap(), r["min_ms"].as_f64().unwrap());
        assert!(min > 0.0 && min <= median, "{r}");
        assert!(r["gb_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(["timestamp", "wall"].contains(&r["timing"].as_str().unwrap()), "{r}");
        if r["device"] == "gpu" {
            // The in-run rooflines: the copy for both passes, the read for the loss alone.
            assert!(r["tuning"].as_str().is_some_and(|t| t.contains("XENT_WORKGROUP_SIZE=")), "{r}");
            let copy = r["copy_ms"].as_f64().unwrap();
            let ratio = r["ratio_to_copy"].as_f64().unwrap();
            assert!(copy > 0.0 && (ratio - median / copy).abs() <= 1e-3 * ratio, "{r}");
            if r["pass"] == "forward" {
                let read = r["read_ms"].as_f64().unwrap();
                let ratio = r["ratio_to_read"].as_f64().unwrap();
                assert!(read > 0.0 && (ratio - median / read).abs() <= 1e-3 * ratio, "{r}");
            }
        } else {
            assert!(r.get("copy_ms").is_none_or(|c| c.is_null()), "{r}");
        }
    }
}

#[test]
fn eval_fortran_order_logits_match_c_order() {
    // The same logits saved column-major (as scikit-learn and np.asfortranarray do):
    // `eval` transposes them on reading and gets the same loss and gradient.
    let dir = Dir::new("fortran");
    let (n, v) = (37, 130);
    let logits = synth::logits(n, v, 2.0, 61);
    let targets = synth::targets(n, v, 61);
    let (c, f, t) = (dir.path("c.npy"), dir.path("f.npy"), dir.path("t.npy"));
    npy::write_f32(&c, &[n, v], &logits).unwrap();
    npy::write_i64(&t, &targets).unwrap();
    let dict = format!("{{'descr': '<f4', 'fortran_order': True, 'shape': ({n}, {v}), }}");
    let pad = (64 - (10 + dict.len() + 1) % 64) % 64;
    let header = format!("{dict}{}\n", " ".repeat(pad));
    let mut file = b"\x93NUMPY\x01\x00".to_vec();
    file.extend_from_slice(&(header.len() as u16).to_le_bytes());
    file.extend_from_slice(header.as_bytes());
    let column_major: Vec<f32> =
        (0..v).flat_map(|col| (0..n).map(move |r| (r, col))).map(|(r, col)| logits[r * v + col]).collect();
    file.extend_from_slice(bytemuck::cast_slice(&column_major));
    std::fs::write(&f, file).unwrap();
    for reduction in [Reduction::Mean, Reduction::None] {
        let run = |l: &Path| {
            eval(&dir, "reference", &["--logits", s(l), "--targets", s(&t), "--reduction", reduction.name()])
        };
        let (want, got) = (run(&c), run(&f));
        assert_eq!(json_field(&got.stdout, "rows"), n.to_string());
        assert_eq!(json_field(&got.stdout, "classes"), v.to_string());
        assert_eq!(got.loss, want.loss, "{reduction:?}");
        assert_eq!(got.grad, want.grad, "{reduction:?}");
    }
}

#[test]
fn gpu_runs_print_nothing_on_stderr_without_a_runtime_dir() {
    // Mesa's Vulkan device-selection layer looked for a Wayland display on every adapter
    // enumeration, and libwayland printed "error: XDG_RUNTIME_DIR is invalid or not set"
    // where there is none (containers, CI, cron): a clean run prints nothing on stderr.
    if common::gpus("gpu_runs_print_nothing_on_stderr_without_a_runtime_dir").is_empty() {
        return;
    }
    let dir = Dir::new("quiet");
    let (n, v) = (8, 300);
    let (l, t) = (dir.path("l.npy"), dir.path("t.npy"));
    npy::write_f32(&l, &[n, v], &synth::logits(n, v, 2.0, 71)).unwrap();
    npy::write_i64(&t, &synth::targets(n, v, 71)).unwrap();
    let eval = ["eval", "--logits", s(&l), "--targets", s(&t), "--device", "gpu"];
    for args in [&eval[..], &["info"]] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xent"));
        cmd.args(args).env_remove("XDG_RUNTIME_DIR");
        // wgpu's debugging flags bring back its own instance (and their own messages).
        for flag in ["WGPU_VALIDATION", "WGPU_DEBUG", "WGPU_GPU_BASED_VALIDATION"] {
            cmd.env_remove(flag);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "xent {args:?}: {stderr}");
        assert_eq!(stderr, "", "xent {args:?} printed on stderr");
    }
}

#[test]
fn bench_options_time_each_set_against_the_plain_loss_of_the_same_run() {
    // The sets in command-line order, each once, the plain loss first although not listed.
    let args =
        ["bench", "--device", "cpu", "--rows", "8", "--classes", "300", "--iters", "2", "--pass", "forward"];
    let (code, stdout, stderr) =
        xent(&[&args[..], &["--options", "softcap,all", "--options", "softcap", "--json"]].concat());
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let sets: Vec<&str> = rows.iter().map(|r| r["options"].as_str().unwrap()).collect();
    assert_eq!(sets, ["plain", "softcap", "all"], "{stdout}");
    let plain = rows[0]["median_ms"].as_f64().unwrap();
    for r in &rows {
        let (ratio, median) = (r["ratio_to_plain"].as_f64().unwrap(), r["median_ms"].as_f64().unwrap());
        assert!((ratio - median / plain).abs() <= 1e-3 * ratio, "{r}");
    }
    // The table has the two columns; an unknown set is a usage error that lists the sets.
    let (code, stdout, stderr) = xent(&[&args[..], &["--options", "z-loss"]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("÷plain") && stdout.contains("z-loss"), "{stdout}");
    let (code, _, stderr) = xent(&["bench", "--options", "nope"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("smoothing") && stderr.contains("z-loss"), "{stderr}");
    // On a GPU, a set the device-resident kernels do not take is timed through the host
    // API, with the plain loss there too: every ratio divides by the same API's plain time.
    if common::gpus("bench_options_time_each_set_against_the_plain_loss_of_the_same_run").is_empty() {
        return;
    }
    let gpu = ["bench", "--device", "gpu", "--rows", "8", "--classes", "300", "--iters", "2"];
    let (code, stdout, stderr) = xent(&[&gpu[..], &["--options", "all,softcap", "--json"]].concat());
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    for pass in ["forward", "forward-backward"] {
        let of_pass: Vec<_> = rows.iter().filter(|r| r["pass"] == pass).collect();
        for set in ["all", "softcap"] {
            assert!(of_pass.iter().any(|r| r["options"] == set), "{pass} {set}: {stdout}");
        }
        for r in &of_pass {
            let plain = of_pass.iter().find(|p| p["options"] == "plain" && p["api"] == r["api"]);
            let plain =
                plain.unwrap_or_else(|| panic!("no plain row for {r}"))["median_ms"].as_f64().unwrap();
            let (ratio, median) = (r["ratio_to_plain"].as_f64().unwrap(), r["median_ms"].as_f64().unwrap());
            assert!((ratio - median / plain).abs() <= 1e-3 * ratio, "{r}");
        }
    }
}
