//! `xent eval --hidden H --weight W [--bias B]` and `xent bench --linear` as users drive
//! them: the loss and gradients against `xent::Reference` through the library, every
//! class-index option, half inputs, Fortran order, and the input errors (exit 2, a
//! message naming both sizes, nothing written).

mod common;

use common::cli::{Dir, xent};

use std::path::{Path, PathBuf};

use xent::npy::{self, NpyData};
use xent::{
    Backend, Gradient, HalfFormat, LinearHead, LossOptions, LossOutput, Problem, Reduction, Reference,
    Values, synth,
};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn f32s(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let a = npy::read(path).unwrap();
    match a.data {
        NpyData::F32(v) => (a.shape, v),
        other => panic!("{other:?}"),
    }
}

/// A `.npy` image written by hand: `descr`, `shape`, C or Fortran order, raw data.
fn write_npy(path: &Path, descr: &str, shape: &[usize], fortran: bool, data: &[u8]) {
    let dims = match shape {
        [d] => format!("{d},"),
        ds => ds.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
    };
    let order = if fortran { "True" } else { "False" };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': ({dims}), }}");
    let pad = (64 - (10 + dict.len() + 1) % 64) % 64;
    let header = format!("{dict}{}\n", " ".repeat(pad));
    let mut file = b"\x93NUMPY\x01\x00".to_vec();
    file.extend_from_slice(&(header.len() as u16).to_le_bytes());
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(data);
    std::fs::write(path, file).unwrap();
}

fn write_f16(path: &Path, shape: &[usize], bits: &[u16]) {
    write_npy(path, "<f2", shape, false, bytemuck::cast_slice(bits));
}

/// A head of shape (n, d, v) on disk: h, W, b (float32), targets with one -100 and one
/// target 3 (the `--ignore-index 3` of the option tests), class weights.
struct Head {
    n: usize,
    d: usize,
    v: usize,
    h: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    t: Vec<i64>,
    weights: Vec<f32>,
    paths: [PathBuf; 5],
}

impl Head {
    fn new(dir: &Dir, n: usize, d: usize, v: usize, seed: u64) -> Self {
        let h = synth::logits(n, d, 1.0, seed);
        let w = synth::logits(v, d, 2.0 / (d as f64).sqrt(), seed + 1);
        let b = synth::logits(1, v, 0.5, seed + 2);
        let mut t = synth::targets(n, v, seed);
        t[1] = -100;
        t[n - 1] = 3;
        let weights: Vec<f32> = (0..v).map(|c| 0.5 + (c % 7) as f32 / 4.0).collect();
        let paths = ["h.npy", "w.npy", "b.npy", "t.npy", "cw.npy"].map(|f| dir.path(f));
        npy::write_f32(&paths[0], &[n, d], &h).unwrap();
        npy::write_f32(&paths[1], &[v, d], &w).unwrap();
        npy::write_f32(&paths[2], &[v], &b).unwrap();
        npy::write_i64(&paths[3], &t).unwrap();
        npy::write_f32(&paths[4], &[v], &weights).unwrap();
        Head { n, d, v, h, w, b, t, weights, paths }
    }
    /// `--hidden H --weight W --bias B --targets T`.
    fn args(&self) -> Vec<&str> {
        let p = &self.paths;
        vec!["--hidden", s(&p[0]), "--weight", s(&p[1]), "--bias", s(&p[2]), "--targets", s(&p[3])]
    }
    /// The reference's loss (row losses for `none`) and owned dh, dW, db.
    fn reference(&self, opts: &LossOptions) -> LossOutput {
        self.reference_with(&self.t, opts)
    }
    /// The same against targets `t`.
    fn reference_with(&self, t: &[i64], opts: &LossOptions) -> LossOutput {
        let head =
            LinearHead::new(Values::F32(&self.h), Values::F32(&self.w), self.d).bias(Values::F32(&self.b));
        Reference.evaluate(Problem::linear(head, t).gradient(Gradient::Owned), opts).unwrap()
    }
}

/// What one successful `xent eval --hidden` printed and wrote.
struct Run {
    stdout: String,
    loss: (Vec<usize>, Vec<f32>),
    dh: (Vec<usize>, Vec<f32>),
    dw: (Vec<usize>, Vec<f32>),
    db: (Vec<usize>, Vec<f32>),
}

/// `xent eval ARGS --device DEVICE` writing the loss and the three gradients into `dir`.
fn eval(dir: &Dir, device: &str, args: &[&str]) -> Run {
    let outs = ["loss.npy", "dh.npy", "dw.npy", "db.npy"].map(|f| dir.path(f));
    let mut all = vec!["eval"];
    all.extend_from_slice(args);
    all.extend(["--device", device, "--out-loss", s(&outs[0]), "--out-grad-hidden", s(&outs[1])]);
    all.extend(["--out-grad-weight", s(&outs[2]), "--out-grad-bias", s(&outs[3])]);
    let (code, stdout, stderr) = xent(&all);
    assert_eq!(code, 0, "{device} {all:?}: {stderr}");
    Run { stdout, loss: f32s(&outs[0]), dh: f32s(&outs[1]), dw: f32s(&outs[2]), db: f32s(&outs[3]) }
}

fn json_field<'a>(json: &'a str, key: &str) -> &'a str {
    let at = json.find(&format!("\"{key}\": ")).unwrap_or_else(|| panic!("{key} in {json}")) + key.len() + 4;
    json[at..].split([',', '}']).next().unwrap().trim()
}

/// `got` within `tol · (1 + max |want|)` of `want`, element by element (exact on the
/// reference, which is the same computation as the library's).
fn close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = 1.0 + want.iter().fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(g) - f64::from(w)).abs();
        assert!(
            err <= tol * scale || (g.is_nan() && w.is_nan()),
            "{what}[{i}]: {g} vs {w} (tol {tol} × {scale})"
        );
    }
}

/// The tolerance of a device against the reference: none on the reference itself, f32
/// GEMM sums over D or V elsewhere.
fn tolerance(device: &str) -> f64 {
    if device == "reference" { 0.0 } else { 2e-5 }
}

/// Every reduction with the bias, then every class-index option at once, on `device`.
fn every_option_on(device: &str) {
    let dir = Dir::new(&format!("options-{device}"));
    let hd = Head::new(&dir, 23, 12, 37, 5);
    let tol = tolerance(device);
    for reduction in ["mean", "sum", "none"] {
        let opts = LossOptions::new().reduction(match reduction {
            "mean" => Reduction::Mean,
            "sum" => Reduction::Sum,
            _ => Reduction::None,
        });
        let want = hd.reference(&opts);
        let mut args = hd.args();
        args.extend(["--reduction", reduction]);
        let run = eval(&dir, device, &args);
        match reduction {
            "none" => {
                // One loss per row (the upstream gradient 1 per row), `loss` null.
                assert_eq!(run.loss.0, vec![hd.n], "{device}");
                close("row losses", &run.loss.1, want.row_losses.as_deref().unwrap(), tol);
                assert_eq!(json_field(&run.stdout, "loss"), "null");
            }
            _ => {
                assert!(run.loss.0.is_empty(), "{device}: 0-d loss, got {:?}", run.loss.0);
                close("loss", &run.loss.1, &[want.loss.unwrap()], tol);
                let printed: f32 = json_field(&run.stdout, "loss").parse().unwrap();
                assert_eq!(printed, run.loss.1[0], "{device}: JSON and file agree");
            }
        }
        assert_eq!(run.dh.0, vec![hd.n, hd.d]);
        assert_eq!(run.dw.0, vec![hd.v, hd.d]);
        assert_eq!(run.db.0, vec![hd.v]);
        close("dh", &run.dh.1, want.grad_hidden.as_deref().unwrap(), tol);
        close("dW", &run.dw.1, want.grad_weight.as_deref().unwrap(), tol);
        close("db", &run.db.1, want.grad_bias.as_deref().unwrap(), tol);
        for (key, value) in [("rows", hd.n), ("classes", hd.v), ("hidden_dim", hd.d)] {
            assert_eq!(json_field(&run.stdout, key), value.to_string(), "{}", run.stdout);
        }
        assert_eq!(json_field(&run.stdout, "device"), format!("\"{device}\""));
    }

    let opts = LossOptions::new()
        .ignore_index(3)
        .weights(hd.weights.clone())
        .label_smoothing(0.1)
        .z_loss(1e-3)
        .softcap(5.0)
        .logit_scale(0.7)
        .n_items(17.0);
    // Row 1's -100 becomes a 3: ignored under --ignore-index 3, like row n - 1's.
    let t3: Vec<i64> = hd.t.iter().map(|&t| if t == -100 { 3 } else { t }).collect();
    let t3_path = dir.path("t3.npy");
    npy::write_i64(&t3_path, &t3).unwrap();
    let want = hd.reference_with(&t3, &opts);
    let mut args = hd.args();
    *args.last_mut().unwrap() = s(&t3_path);
    #[rustfmt::skip]
    args.extend([
        "--weights", s(&hd.paths[4]), "--ignore-index", "3", "--label-smoothing", "0.1",
        "--z-loss", "1e-3", "--softcap", "5", "--logit-scale", "0.7", "--n-items", "17",
    ]);
    let run = eval(&dir, device, &args);
    close("loss", &run.loss.1, &[want.loss.unwrap()], tol);
    let z: f32 = json_field(&run.stdout, "z_loss").parse().unwrap();
    close("z_loss", &[z], &[want.z_loss.unwrap()], tol);
    close("dh", &run.dh.1, want.grad_hidden.as_deref().unwrap(), tol);
    close("dW", &run.dw.1, want.grad_weight.as_deref().unwrap(), tol);
    close("db", &run.db.1, want.grad_bias.as_deref().unwrap(), tol);
    // The gradients are optional, each on its own; without any, the loss alone.
    let (code, stdout, stderr) = xent(&[&["eval"], &hd.args()[..], &["--device", device]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(json_field(&stdout, "hidden_dim"), hd.d.to_string());
}

#[test]
fn eval_hidden_takes_every_option_on_the_reference() {
    every_option_on("reference");
}

/// Fails until the fast CPU path computes the linear head (`Error::Unsupported` before).
#[test]
fn eval_hidden_takes_every_option_on_the_fast_cpu_path() {
    every_option_on("cpu");
}

/// Fails until the GPU computes the linear head (`Error::Unsupported` before).
#[test]
fn eval_hidden_takes_every_option_on_the_gpu() {
    if common::gpus("eval_hidden_takes_every_option_on_the_gpu").is_empty() {
        return;
    }
    every_option_on("gpu");
}

#[test]
fn eval_hidden_without_bias_and_in_fortran_order() {
    let dir = Dir::new("fortran");
    let hd = Head::new(&dir, 19, 10, 33, 9);
    // h and W saved column-major, as np.asfortranarray does.
    let column_major = |x: &[f32], rows: usize, cols: usize| -> Vec<f32> {
        (0..cols * rows).map(|i| x[(i % rows) * cols + i / rows]).collect()
    };
    let (fh, fw) = (dir.path("fh.npy"), dir.path("fw.npy"));
    write_npy(&fh, "<f4", &[hd.n, hd.d], true, bytemuck::cast_slice(&column_major(&hd.h, hd.n, hd.d)));
    write_npy(&fw, "<f4", &[hd.v, hd.d], true, bytemuck::cast_slice(&column_major(&hd.w, hd.v, hd.d)));
    let opts = LossOptions::new();
    let head = LinearHead::new(Values::F32(&hd.h), Values::F32(&hd.w), hd.d);
    let want = Reference.evaluate(Problem::linear(head, &hd.t).gradient(Gradient::Owned), &opts).unwrap();
    let (lo, dh, dw) = (dir.path("loss.npy"), dir.path("dh.npy"), dir.path("dw.npy"));
    #[rustfmt::skip]
    let (code, stdout, stderr) = xent(&[
        "eval", "--hidden", s(&fh), "--weight", s(&fw), "--targets", s(&hd.paths[3]),
        "--device", "reference", "--out-loss", s(&lo), "--out-grad-hidden", s(&dh), "--out-grad-weight", s(&dw),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(f32s(&lo).1, vec![want.loss.unwrap()], "{stdout}");
    assert_eq!(f32s(&dh).1, want.grad_hidden.unwrap());
    assert_eq!(f32s(&dw).1, want.grad_weight.unwrap());
}

#[test]
fn eval_hidden_float16() {
    let dir = Dir::new("f16");
    let hd = Head::new(&dir, 17, 8, 29, 13);
    let f16 = HalfFormat::F16;
    let bits = |x: &[f32]| x.iter().map(|&v| f16.from_f32(v)).collect::<Vec<u16>>();
    let (h16, w16, b16) = (bits(&hd.h), bits(&hd.w), bits(&hd.b));
    let (ph, pw, pb) = (dir.path("h16.npy"), dir.path("w16.npy"), dir.path("b16.npy"));
    write_f16(&ph, &[hd.n, hd.d], &h16);
    write_f16(&pw, &[hd.v, hd.d], &w16);
    write_f16(&pb, &[hd.v], &b16);
    let opts = LossOptions::new().label_smoothing(0.05);
    // The bias in float16 (the inputs' type) or in float32.
    for (bias, b_values) in [(&pb, Values::Half(&b16, f16)), (&hd.paths[2], Values::F32(&hd.b))] {
        let head = LinearHead::new(Values::Half(&h16, f16), Values::Half(&w16, f16), hd.d).bias(b_values);
        let want = Reference.evaluate(Problem::linear(head, &hd.t).gradient(Gradient::Owned), &opts).unwrap();
        #[rustfmt::skip]
        let args = [
            "--hidden", s(&ph), "--weight", s(&pw), "--bias", s(bias), "--targets", s(&hd.paths[3]),
            "--label-smoothing", "0.05",
        ];
        let run = eval(&dir, "reference", &args);
        assert_eq!(run.loss.1, vec![want.loss.unwrap()]);
        assert_eq!(run.dh.1, want.grad_hidden.unwrap(), "dh in float32");
        assert_eq!(run.dw.1, want.grad_weight.unwrap());
        assert_eq!(run.db.1, want.grad_bias.unwrap());
    }
    // float16 h with float32 W is refused, naming both files and types.
    let (code, _, stderr) = xent(&[
        "eval",
        "--hidden",
        s(&ph),
        "--weight",
        s(&hd.paths[1]),
        "--targets",
        s(&hd.paths[3]),
        "--device",
        "reference",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("float16") && stderr.contains("float32") && stderr.contains("w.npy"), "{stderr}");
}

#[test]
fn logits_and_hidden_exclude_each_other_and_head_flags_need_hidden() {
    let dir = Dir::new("exclusive");
    let hd = Head::new(&dir, 4, 3, 5, 1);
    let l = dir.path("l.npy");
    npy::write_f32(&l, &[4, 5], &synth::logits(4, 5, 1.0, 2)).unwrap();
    let (h, w, b, t) = (s(&hd.paths[0]), s(&hd.paths[1]), s(&hd.paths[2]), s(&hd.paths[3]));
    let out = dir.path("out.npy");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--logits", s(&l), "--hidden", h, "--weight", w], "--logits and --hidden exclude each other"),
        (vec![], "give --logits [N, V], or the linear head's --hidden [N, D] and --weight [V, D]"),
        (vec!["--hidden", h], "--hidden needs the linear head's --weight"),
        (vec!["--logits", s(&l), "--weight", w], "--weight belongs to the linear head (--hidden)"),
        (vec!["--logits", s(&l), "--bias", b], "--bias belongs to the linear head"),
        (
            vec!["--logits", s(&l), "--out-grad-hidden", s(&out)],
            "--out-grad-hidden belongs to the linear head",
        ),
        (vec!["--hidden", h, "--weight", w, "--out-grad", s(&out)], "--out-grad is d(loss)/d(logits)"),
        (vec!["--hidden", h, "--weight", w, "--out-grad-bias", s(&out)], "--out-grad-bias needs --bias"),
        (vec!["--hidden", h, "--weight", w, "--loss-kind", "bce"], "class-index targets"),
    ];
    let before = dir.files();
    for (extra, needle) in cases {
        let mut args = vec!["eval", "--targets", t, "--device", "reference", "--out-loss", s(&out)];
        args.extend(extra);
        let (code, stdout, stderr) = xent(&args);
        assert_eq!(code, 2, "{args:?}: {stdout} {stderr}");
        assert!(stderr.contains(needle), "{args:?}: '{needle}' not in {stderr}");
        assert_eq!(dir.files(), before, "{args:?} wrote a file");
    }
    // Probability targets (float32 [N, V]) are not the head's.
    let probs = dir.path("p.npy");
    npy::write_f32(&probs, &[4, 5], &[0.2; 20]).unwrap();
    let (code, _, stderr) =
        xent(&["eval", "--hidden", h, "--weight", w, "--targets", s(&probs), "--device", "reference"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("class-index targets"), "{stderr}");
}

#[test]
fn shape_mismatches_name_both_sizes_and_write_nothing() {
    let dir = Dir::new("shapes");
    let hd = Head::new(&dir, 3, 4, 8, 3);
    let (h, w, b, t) = (s(&hd.paths[0]), s(&hd.paths[1]), s(&hd.paths[2]), s(&hd.paths[3]));
    let (w5, b7, t2, h1) = (dir.path("w5.npy"), dir.path("b7.npy"), dir.path("t2.npy"), dir.path("h1.npy"));
    npy::write_f32(&w5, &[8, 5], &[0.1; 40]).unwrap();
    npy::write_f32(&b7, &[7], &[0.0; 7]).unwrap();
    npy::write_i64(&t2, &[0, 1]).unwrap();
    npy::write_f32(&h1, &[12], &[0.0; 12]).unwrap();
    let bad_t = dir.path("bad_t.npy");
    npy::write_i64(&bad_t, &[0, 8, 1]).unwrap();
    let short_cw = dir.path("short_cw.npy");
    npy::write_f32(&short_cw, &[7], &[1.0; 7]).unwrap();
    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        // H's D (4) against W's D (5).
        (
            vec!["--hidden", h, "--weight", s(&w5), "--targets", t],
            &["[8, 5]", "[3, 4]", "has 5 elements, expected 4"],
        ),
        // B's V (7) against W's V (8).
        (
            vec!["--hidden", h, "--weight", w, "--bias", s(&b7), "--targets", t],
            &["[7]", "V = 8", "expected 8"],
        ),
        // The targets' N (2) against H's N (3).
        (vec!["--hidden", h, "--weight", w, "--targets", s(&t2)], &["[2]", "N = 3", "expected 3"]),
        (vec!["--hidden", s(&h1), "--weight", w, "--targets", t], &["hidden must be 2-D [N, D]"]),
        (vec!["--hidden", h, "--weight", w, "--targets", s(&bad_t)], &["row 1: 8"]),
        (
            vec!["--hidden", h, "--weight", w, "--targets", t, "--weights", s(&short_cw)],
            &["has 7 elements, expected 8"],
        ),
    ];
    let before = dir.files();
    let outs = ["loss.npy", "dh.npy", "dw.npy", "db.npy"].map(|f| dir.path(f));
    for (extra, needles) in cases {
        let mut args = vec!["eval", "--device", "reference", "--out-loss", s(&outs[0])];
        args.extend(["--out-grad-hidden", s(&outs[1]), "--out-grad-weight", s(&outs[2])]);
        if extra.contains(&"--bias") {
            args.extend(["--out-grad-bias", s(&outs[3])]);
        }
        args.extend(extra);
        let (code, stdout, stderr) = xent(&args);
        assert_eq!(code, 2, "{args:?}: {stdout} {stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{args:?}: '{needle}' not in {stderr}");
        }
        assert_eq!(dir.files(), before, "{args:?} wrote a file");
    }
    // The same inputs with matching shapes run (so the errors above are the shapes').
    let (code, _, stderr) =
        xent(&["eval", "--hidden", h, "--weight", w, "--bias", b, "--targets", t, "--device", "reference"]);
    assert_eq!(code, 0, "{stderr}");
}

/// `bench --linear --json` on a tiny shape: every field present and consistent. Needs the
/// fast CPU path's linear head (bench has no reference device).
#[test]
fn bench_linear_json_has_every_field() {
    let (n, d, v) = (16, 8, 50);
    #[rustfmt::skip]
    let (code, stdout, stderr) = xent(&[
        "bench", "--linear", "--device", "cpu", "--rows", "16", "--hidden-dim", "8", "--classes", "50",
        "--iters", "1", "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let passes: Vec<&str> = rows.iter().map(|r| r["pass"].as_str().unwrap()).collect();
    assert_eq!(passes, ["forward", "forward-backward"], "{stdout}");
    for r in &rows {
        assert_eq!(r["device"], "cpu", "{r}");
        assert!(r["adapter"].as_str().is_some_and(|a| !a.is_empty()), "{r}");
        assert_eq!(
            (r["rows"].as_u64(), r["hidden_dim"].as_u64(), r["classes"].as_u64()),
            (Some(n), Some(d), Some(v))
        );
        let (median, min) = (r["median_ms"].as_f64().unwrap(), r["min_ms"].as_f64().unwrap());
        assert!(min > 0.0 && min <= median, "{r}");
        assert_eq!(r["timing"], "wall", "{r}");
        let flop = if r["pass"] == "forward" { 2.0 } else { 6.0 } * (n * d * v) as f64;
        let gflops = r["gflop_per_s"].as_f64().unwrap();
        assert!((gflops - flop / (median * 1e-3) / 1e9).abs() <= 1e-3 * gflops + 1e-4, "{r}");
        assert!(r["peak_bytes"].as_u64().is_some(), "{r}");
        assert!(r.get("gemm_ms").is_none() && r.get("ratio_to_gemm").is_none(), "GPU only: {r}");
    }
    // --metrics adds a row per pass with the metrics beside the loss.
    #[rustfmt::skip]
    let (code, stdout, stderr) = xent(&[
        "bench", "--linear", "--device", "cpu", "--rows", "16", "--hidden-dim", "8", "--classes", "50",
        "--iters", "1", "--json", "--metrics",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let sets: Vec<(&str, &str)> =
        rows.iter().map(|r| (r["pass"].as_str().unwrap(), r["options"].as_str().unwrap())).collect();
    assert_eq!(
        sets,
        [
            ("forward", "plain"),
            ("forward", "metrics"),
            ("forward-backward", "plain"),
            ("forward-backward", "metrics")
        ]
    );
    // --hidden-dim needs --linear; --linear takes the three sizes together.
    let (code, _, stderr) = xent(&["bench", "--hidden-dim", "8"]);
    assert_eq!(code, 2, "{stderr}");
    let (code, _, stderr) = xent(&["bench", "--linear", "--rows", "4", "--classes", "9", "--device", "cpu"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--rows, --hidden-dim and --classes together"), "{stderr}");
}

/// On the GPU: gemm_ms and ratio_to_gemm beside the fixed fields. Fails until the GPU
/// computes the linear head.
#[test]
fn bench_linear_json_on_the_gpu() {
    if common::gpus("bench_linear_json_on_the_gpu").is_empty() {
        return;
    }
    #[rustfmt::skip]
    let (code, stdout, stderr) = xent(&[
        "bench", "--linear", "--device", "gpu", "--rows", "16", "--hidden-dim", "8", "--classes", "50",
        "--iters", "1", "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(rows.len(), 2, "{stdout}");
    for r in &rows {
        assert_eq!(r["device"], "gpu", "{r}");
        assert!(r["peak_bytes"].as_u64().is_some() && r["gflop_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
}
