//! `xent eval --metrics` on every device: the JSON's "metrics" against the committed
//! scikit-learn / PyTorch figures (tests/data/metrics_*), `--out-pred` as int64 [N],
//! `--plot` as a parseable SVG, the linear head's metrics, and the refusals.

mod common;

use common::cli::{Dir, xent};
use xent::npy::{self, NpyData};

fn data(case: &str, file: &str) -> String {
    format!("{}/tests/data/{case}/{file}", env!("CARGO_MANIFEST_DIR"))
}

/// The devices to run: the CPU paths, and the GPU unless the user opted out.
fn devices(test: &str) -> Vec<&'static str> {
    let mut d = vec!["reference", "cpu"];
    if std::env::var("XENT_SKIP_GPU").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED the GPU part of {test}: XENT_SKIP_GPU=1");
    } else {
        d.push("gpu");
    }
    d
}

#[test]
fn eval_metrics_match_the_committed_figures_on_every_device() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data("metrics_basic", "metrics.json")).unwrap())
            .unwrap();
    let pred: Vec<i64> = expected["pred"].as_array().unwrap().iter().map(|p| p.as_i64().unwrap()).collect();
    for device in devices("eval_metrics_match_the_committed_figures_on_every_device") {
        let dir = Dir::new(&format!("metrics-{device}"));
        let (p, svg) = (dir.path("pred.npy"), dir.path("cal.svg"));
        let (code, stdout, stderr) = xent(&[
            "eval",
            "--logits",
            &data("metrics_basic", "logits.npy"),
            "--targets",
            &data("metrics_basic", "targets.npy"),
            "--device",
            device,
            "--metrics",
            "--top-k",
            "1,3,5",
            "--ece-bins",
            "15",
            "--out-pred",
            p.to_str().unwrap(),
            "--plot",
            svg.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{device}: {stderr}");
        assert!(stderr.is_empty(), "{device}: a clean run prints nothing on stderr: {stderr}");
        let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let m = &json["metrics"];
        assert_eq!(m["counted_rows"], expected["counted_rows"], "{device}");
        for k in ["1", "3", "5"] {
            assert_eq!(
                m["top_k_accuracy"][k].as_f64(),
                expected["top_k_accuracy"][k].as_f64(),
                "{device}: top-{k}"
            );
        }
        assert_eq!(m["accuracy"].as_f64(), expected["accuracy"].as_f64(), "{device}");
        for f in ["nll", "perplexity", "entropy", "ece"] {
            let (g, e) = (m[f].as_f64().unwrap(), expected[f].as_f64().unwrap());
            assert!((g - e).abs() <= 1e-5 * e.abs() + 1e-6, "{device}: {f} {g} vs {e}");
        }
        let NpyData::I64(got) = npy::read(&p).unwrap().data else { panic!("--out-pred is not int64") };
        assert_eq!(got, pred, "{device}: predictions");
        let text = std::fs::read_to_string(&svg).unwrap();
        let doc = roxmltree::Document::parse(&text).unwrap();
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        assert!(text.contains("ECE"), "{device}: the title names the ECE");
    }
}

#[test]
fn eval_metrics_of_the_linear_head() {
    let case = "linear_many_rows";
    let dir = Dir::new("metrics-linear");
    let p = dir.path("pred.npy");
    let mut outs = Vec::new();
    for device in ["reference", "cpu"] {
        let (code, stdout, stderr) = xent(&[
            "eval",
            "--hidden",
            &data(case, "hidden.npy"),
            "--weight",
            &data(case, "weight.npy"),
            "--targets",
            &data(case, "targets.npy"),
            "--device",
            device,
            "--metrics",
            "--out-pred",
            p.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{device}: {stderr}");
        let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let NpyData::I64(pred) = npy::read(&p).unwrap().data else { panic!("int64") };
        outs.push((json["metrics"].clone(), pred));
    }
    assert_eq!(outs[0].1, outs[1].1, "the same predictions on both CPU paths");
    assert_eq!(outs[0].0["counted_rows"], outs[1].0["counted_rows"]);
    assert_eq!(outs[0].0["accuracy"], outs[1].0["accuracy"]);
}

#[test]
fn eval_metrics_refusals_name_the_problem() {
    let dir = Dir::new("metrics-refused");
    let p = dir.path("pred.npy");
    let logits = data("metrics_basic", "logits.npy");
    let targets = data("metrics_basic", "targets.npy");
    // --out-pred needs --metrics (clap says so, exit 2).
    let (code, _, stderr) =
        xent(&["eval", "--logits", &logits, "--targets", &targets, "--out-pred", p.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--metrics"), "{stderr}");
    // Binary cross-entropy has no class per row.
    let (code, _, stderr) = xent(&[
        "eval",
        "--logits",
        &logits,
        "--targets",
        &logits,
        "--loss-kind",
        "bce",
        "--metrics",
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--metrics") && stderr.contains("bce"), "{stderr}");
    // A k of 0, before any file is read.
    let (code, _, stderr) = xent(&[
        "eval",
        "--logits",
        &logits,
        "--targets",
        &targets,
        "--metrics",
        "--top-k",
        "0",
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("top-k"), "{stderr}");
    assert!(dir.files().is_empty(), "nothing written: {:?}", dir.files());
}
