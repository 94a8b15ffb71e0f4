//! `xent bench --plot`: the SVG picture as users get it (well-formed, the series named,
//! the rooflines on the GPU), the JSON untouched by it, and a failed write that leaves
//! nothing behind. The reliability diagram (`calibration_svg`) is tested beside its code
//! in src/cli/plot.rs until `eval --plot` reaches it.

mod common;

use common::cli::{Dir, xent};

/// The text of every `<text>` element of a well-formed SVG document.
fn svg_texts(path: &std::path::Path) -> Vec<String> {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("not XML: {e}\n{svg}"));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg", "{svg}");
    assert_eq!(root.tag_name().namespace(), Some("http://www.w3.org/2000/svg"), "{svg}");
    assert!(root.attribute("width").is_some() && root.attribute("height").is_some(), "{svg}");
    root.descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(|n| n.text().unwrap_or("").trim().to_string())
        .collect()
}

#[test]
fn bench_plot_is_an_svg_naming_each_series() {
    let dir = Dir::new("plot-cpu");
    let svg = dir.path("b.svg");
    let args = [
        "bench",
        "--device",
        "cpu",
        "--rows",
        "64",
        "--classes",
        "1000",
        "--iters",
        "2",
        "--pass",
        "forward",
    ];
    let (code, stdout, stderr) = xent(&[&args[..], &["--plot", svg.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    // The table is still printed; the picture is written whole, with no temporary file left.
    assert!(stdout.contains("cpu fast"), "{stdout}");
    assert_eq!(dir.files(), ["b.svg"]);
    let texts = svg_texts(&svg);
    let has = |t: &str| texts.iter().any(|x| x == t);
    assert!(has("cpu forward"), "{texts:?}");
    assert!(!has("cpu forward-backward"), "only the forward pass was timed: {texts:?}");
    assert!(has("64×1000"), "{texts:?}");
    assert!(texts.iter().any(|t| t.starts_with("xent bench: cross-entropy throughput")), "{texts:?}");
    assert!(texts.iter().any(|t| t.starts_with("GB/s")), "the axis says what is drawn: {texts:?}");
    assert!(texts.iter().any(|t| t.starts_with("cpu: cpu fast")), "{texts:?}");

    // Again over the existing picture: replaced, still nothing else in the directory.
    let (code, _, stderr) =
        xent(&[&args[..], &["--plot", svg.to_str().unwrap(), "--options", "softcap"]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(dir.files(), ["b.svg"]);
    let texts = svg_texts(&svg);
    assert!(
        texts.iter().any(|x| x == "cpu forward") && texts.iter().any(|x| x == "cpu forward softcap"),
        "{texts:?}"
    );
}

#[test]
fn bench_plot_draws_the_gpu_rooflines() {
    if common::gpus("bench_plot_draws_the_gpu_rooflines").is_empty() {
        return;
    }
    let dir = Dir::new("plot-gpu");
    let svg = dir.path("b.svg");
    let (code, stdout, stderr) = xent(&[
        "bench",
        "--device",
        "all",
        "--rows",
        "16",
        "--classes",
        "1000",
        "--iters",
        "2",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let texts = svg_texts(&svg);
    for series in [
        "gpu forward",
        "gpu forward-backward",
        "cpu forward",
        "cpu forward-backward",
        "copy roofline",
        "read roofline",
    ] {
        assert!(texts.iter().any(|t| t == series), "{series} in {texts:?}");
    }
    assert!(texts.iter().any(|t| t.starts_with("gpu: ")), "the adapter is named: {texts:?}");
}

#[test]
fn bench_json_is_the_same_with_plot() {
    // The JSON keys (and the values that are not timings) do not change with --plot.
    let dir = Dir::new("plot-json");
    let svg = dir.path("b.svg");
    let args = ["bench", "--device", "cpu", "--rows", "8", "--classes", "300", "--iters", "1", "--json"];
    let parse = |stdout: &str| -> Vec<serde_json::Value> {
        serde_json::from_str(stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    let (code, plain, stderr) = xent(&args);
    assert_eq!(code, 0, "{stderr}");
    let (code, plotted, stderr) = xent(&[&args[..], &["--plot", svg.to_str().unwrap()]].concat());
    assert_eq!(code, 0, "{stderr}");
    let (plain, plotted) = (parse(&plain), parse(&plotted));
    assert_eq!(plain.len(), plotted.len());
    for (a, b) in plain.iter().zip(&plotted) {
        let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(a), keys(b));
        for k in ["device", "adapter", "rows", "classes", "pass", "options", "api"] {
            assert_eq!(a[k], b[k], "{k}");
        }
    }
    assert_eq!(dir.files(), ["b.svg"]);
    svg_texts(&svg);
}

#[test]
fn bench_plot_into_a_missing_directory_fails_and_writes_nothing() {
    let dir = Dir::new("plot-missing");
    let svg = dir.path("missing").join("b.svg");
    let (code, _, stderr) = xent(&[
        "bench",
        "--device",
        "cpu",
        "--rows",
        "8",
        "--classes",
        "300",
        "--iters",
        "1",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("missing") && stderr.contains("b.svg"), "{stderr}");
    assert!(dir.files().is_empty(), "{:?}", dir.files());
}
