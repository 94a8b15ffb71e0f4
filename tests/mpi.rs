//! `xent eval --parallel rows|vocab` under `mpirun` (the `mpi` feature): 2 and 3 ranks
//! against the single-process run of the same files (loss, metrics, row losses and the
//! gradient each rank writes into its part of one file), and a rank with bad input making
//! every rank exit with the typed error's code and no output file left behind. Without the
//! feature, `--parallel` is a clear error.

mod common;

use common::cli::{Dir, xent};
use xent::npy;
#[cfg(feature = "mpi")]
use xent::npy::NpyData;

#[cfg(feature = "mpi")]
fn mpirun(np: usize, args: &[&str]) -> (i32, String, String) {
    mpirun_with(np, &[], args)
}

/// `mpirun` with `env` exported to every rank.
#[cfg(feature = "mpi")]
fn mpirun_with(np: usize, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new("mpirun");
    for (k, v) in env {
        cmd.env(k, v).args(["-x", k]);
    }
    // Root (CI containers) needs --allow-run-as-root; more ranks than cores needs
    // --oversubscribe.
    cmd.args(["--oversubscribe", "-np", &np.to_string()]);
    if is_root() {
        cmd.arg("--allow-run-as-root");
    }
    // Shared memory without cross-memory attach, which containers often forbid.
    cmd.env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    cmd.arg(env!("CARGO_BIN_EXE_xent")).args(args);
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "mpirun could not be started ({e}): the mpi feature's tests need OpenMPI (Debian: apt-get install \
             openmpi-bin libopenmpi-dev)"
        )
    });
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether this process runs as root (from /proc, without a libc dependency).
#[cfg(feature = "mpi")]
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[cfg(feature = "mpi")]
fn f32s(path: &std::path::Path) -> Vec<f32> {
    match npy::read(path).unwrap().data {
        NpyData::F32(v) => v,
        other => panic!("{other:?}"),
    }
}

/// The value of `"key": number` in one line of JSON.
#[cfg(feature = "mpi")]
fn field(json: &str, key: &str) -> f64 {
    let at = json.find(&format!("\"{key}\": ")).unwrap_or_else(|| panic!("{key} in {json}")) + key.len() + 4;
    let end = json[at..].find([',', '}']).unwrap() + at;
    json[at..end].trim().parse().unwrap_or_else(|_| panic!("{key}: {}", &json[at..end]))
}

/// A batch of 53 rows × 211 classes, with an ignored row.
fn inputs(dir: &Dir, bad_row: Option<usize>) {
    let (n, v) = (53usize, 211usize);
    let logits: Vec<f32> = (0..n * v).map(|i| ((i * 7919 % 1000) as f32 / 125.0) - 4.0).collect();
    let mut targets: Vec<i64> = (0..n as i64).map(|r| (r * 37) % v as i64).collect();
    targets[4] = -100;
    if let Some(r) = bad_row {
        targets[r] = 500;
    }
    npy::write_f32(dir.path("l.npy"), &[n, v], &logits).unwrap();
    npy::write_i64(dir.path("t.npy"), &targets).unwrap();
}

#[cfg(not(feature = "mpi"))]
#[test]
fn parallel_without_the_mpi_feature_is_a_clear_error() {
    let dir = Dir::new("mpi-off");
    inputs(&dir, None);
    let (l, t) = (dir.path("l.npy"), dir.path("t.npy"));
    let (code, _, err) = xent(&[
        "eval",
        "--logits",
        l.to_str().unwrap(),
        "--targets",
        t.to_str().unwrap(),
        "--device",
        "cpu",
        "--parallel",
        "rows",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("mpi feature"), "{err}");
}

#[cfg(feature = "mpi")]
#[test]
fn parallel_rows_and_vocab_over_two_and_three_ranks_equal_one_process() {
    let dir = Dir::new("mpi");
    inputs(&dir, None);
    let s = |p: &str| dir.path(p).to_str().unwrap().to_string();
    let option_sets: [&[&str]; 3] = [
        &["--reduction", "mean", "--metrics", "--top-k", "1,3"],
        &["--reduction", "sum", "--label-smoothing", "0.1", "--z-loss", "0.001", "--softcap", "5"],
        &["--reduction", "none", "--logit-scale", "0.7"],
    ];
    for opts in option_sets {
        let base = |out: &str| {
            let mut a: Vec<String> =
                ["eval", "--logits", &s("l.npy"), "--targets", &s("t.npy"), "--device", "cpu"]
                    .iter()
                    .map(|x| x.to_string())
                    .collect();
            a.extend(opts.iter().map(|x| x.to_string()));
            a.extend([
                "--out-grad".into(),
                s(&format!("g_{out}.npy")),
                "--out-loss".into(),
                s(&format!("l_{out}.npy")),
            ]);
            a
        };
        let single = base("one");
        let (code, one, err) = xent(&single.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(code, 0, "{err}");
        let want_grad = f32s(&dir.path("g_one.npy"));
        let want_loss = f32s(&dir.path("l_one.npy"));
        for (np, device) in [(2, "cpu"), (3, "cpu"), (2, "gpu")] {
            for mode in ["rows", "vocab"] {
                let what = format!("{opts:?}, {mode} over {np} ranks on the {device}");
                let mut args = base(mode);
                args.extend(["--parallel".into(), mode.into()]);
                // The single run is on the fast CPU path; each rank here on its device.
                let at = args.iter().position(|a| a == "--device").unwrap();
                args[at + 1] = device.into();
                let (code, out, err) = mpirun(np, &args.iter().map(String::as_str).collect::<Vec<_>>());
                assert_eq!(code, 0, "{what}: {err}");
                assert_eq!(out.lines().count(), 1, "{what}: only rank 0 prints: {out}");
                assert_eq!(field(&out, "ranks"), np as f64, "{what}");
                assert!(out.contains(&format!("\"parallel\": \"{mode}\"")), "{what}: {out}");
                if !opts.contains(&"none") {
                    let (a, b) = (field(&out, "loss"), field(&one, "loss"));
                    assert!((a - b).abs() <= 1e-5 * b.abs(), "{what}: loss {a} vs {b}");
                }
                if opts.contains(&"--metrics") {
                    for key in ["accuracy", "counted_rows", "1", "3"] {
                        assert_eq!(field(&out, key), field(&one, key), "{what}: {key}");
                    }
                    for key in ["nll", "entropy", "ece"] {
                        assert!((field(&out, key) - field(&one, key)).abs() < 1e-5, "{what}: {key}");
                    }
                }
                let (got_grad, got_loss) =
                    (f32s(&dir.path(&format!("g_{mode}.npy"))), f32s(&dir.path(&format!("l_{mode}.npy"))));
                assert_eq!(got_loss.len(), want_loss.len(), "{what}");
                for (a, b) in got_loss.iter().zip(&want_loss) {
                    assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-3), "{what}: loss file {a} vs {b}");
                }
                let worst =
                    got_grad.iter().zip(&want_grad).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 1e-6, "{what}: gradient differs by {worst}");
                if mode == "rows" && device == "cpu" {
                    assert!(
                        got_grad == want_grad,
                        "{what}: each rank's rows are the single run's, bit for bit"
                    );
                }
            }
        }
    }
    assert!(dir.files().iter().all(|f| !f.contains("xent-tmp")), "temporary files left: {:?}", dir.files());
}

#[cfg(feature = "mpi")]
#[test]
fn a_rank_with_bad_input_ends_every_rank_with_its_error_and_no_file() {
    let dir = Dir::new("mpi-fault");
    inputs(&dir, Some(50)); // the last rank's rows
    let s = |p: &str| dir.path(p).to_str().unwrap().to_string();
    for mode in ["rows", "vocab"] {
        let started = std::time::Instant::now();
        let args = [
            "eval",
            "--logits",
            &s("l.npy"),
            "--targets",
            &s("t.npy"),
            "--device",
            "cpu",
            "--parallel",
            mode,
            "--out-grad",
            &s("g.npy"),
            "--out-loss",
            &s("l_out.npy"),
        ];
        let (code, out, err) = mpirun(3, &args);
        assert_eq!(code, 2, "{mode}: a bad target is bad input: {out} {err}");
        assert!(err.contains("row 50"), "{mode}: the error names the batch's row: {err}");
        assert!(out.is_empty(), "{mode}: {out}");
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "{mode}: {:?}", started.elapsed());
        let files = dir.files();
        assert_eq!(files, ["l.npy", "t.npy"], "{mode}: nothing written: {files:?}");
    }
}

/// The linear head under mpirun: by rows (each rank its rows of h; dW and db summed) and
/// by vocabulary (the tensor-parallel head: each rank its rows of W and b; dh summed),
/// over 2 and 3 ranks, against the single-process run: the loss and every gradient file.
#[cfg(feature = "mpi")]
#[test]
fn parallel_linear_head_by_rows_and_vocabulary_equals_one_process() {
    let dir = Dir::new("mpi-head");
    let (n, d, v) = (45usize, 24usize, 173usize);
    let val = |i: usize, s: usize| ((i * s % 997) as f32 / 997.0 - 0.5) * 0.8;
    npy::write_f32(dir.path("h.npy"), &[n, d], &(0..n * d).map(|i| val(i, 31)).collect::<Vec<_>>()).unwrap();
    npy::write_f32(dir.path("w.npy"), &[v, d], &(0..v * d).map(|i| val(i, 53)).collect::<Vec<_>>()).unwrap();
    npy::write_f32(dir.path("b.npy"), &[v], &(0..v).map(|i| val(i, 7) * 0.1).collect::<Vec<_>>()).unwrap();
    let mut t: Vec<i64> = (0..n as i64).map(|r| (r * 29) % v as i64).collect();
    t[7] = -100;
    npy::write_i64(dir.path("t.npy"), &t).unwrap();
    let s = |p: &str| dir.path(p).to_str().unwrap().to_string();
    let args = |tag: &str| -> Vec<String> {
        let mut a: Vec<String> =
            ["eval", "--hidden", &s("h.npy"), "--weight", &s("w.npy"), "--bias", &s("b.npy")]
                .iter()
                .map(|x| x.to_string())
                .collect();
        a.extend(
            ["--targets", &s("t.npy"), "--device", "cpu", "--label-smoothing", "0.05", "--z-loss", "1e-3"]
                .map(String::from),
        );
        for g in ["hidden", "weight", "bias"] {
            a.extend([format!("--out-grad-{g}"), s(&format!("d{g}_{tag}.npy"))]);
        }
        a
    };
    let one = args("one");
    let (code, single, err) = xent(&one.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{err}");
    for np in [2, 3] {
        for mode in ["rows", "vocab"] {
            let what = format!("the head by {mode} over {np} ranks");
            let mut a = args(mode);
            a.extend(["--parallel".into(), mode.into()]);
            let (code, out, err) = mpirun(np, &a.iter().map(String::as_str).collect::<Vec<_>>());
            assert_eq!(code, 0, "{what}: {err}");
            assert_eq!(field(&out, "hidden_dim"), d as f64, "{what}");
            let (x, y) = (field(&out, "loss"), field(&single, "loss"));
            assert!((x - y).abs() <= 1e-5 * y.abs(), "{what}: loss {x} vs {y}");
            for g in ["hidden", "weight", "bias"] {
                let (got, want) =
                    (f32s(&dir.path(&format!("d{g}_{mode}.npy"))), f32s(&dir.path(&format!("d{g}_one.npy"))));
                assert_eq!(got.len(), want.len(), "{what}: d{g}");
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
                assert!(worst <= 1e-6, "{what}: d{g} differs by {worst}");
            }
        }
    }
}

/// A rank that stalls (as one stuck in a driver would) after the output files exist: the
/// other rank ends the whole job after `--rank-timeout` with an error, every rank exits
/// non-zero, and no file — neither the output nor a temporary one — is left.
#[cfg(feature = "mpi")]
#[test]
fn a_stalled_rank_ends_the_job_after_the_bounded_wait_and_leaves_no_file() {
    let dir = Dir::new("mpi-stall");
    inputs(&dir, None);
    let s = |p: &str| dir.path(p).to_str().unwrap().to_string();
    for (mode, stalled) in [("rows", "1"), ("vocab", "0")] {
        let started = std::time::Instant::now();
        let args = [
            "eval",
            "--logits",
            &s("l.npy"),
            "--targets",
            &s("t.npy"),
            "--device",
            "cpu",
            "--parallel",
            mode,
            "--rank-timeout",
            "2",
            "--out-grad",
            &s("g.npy"),
            "--out-loss",
            &s("l_out.npy"),
        ];
        let (code, out, err) = mpirun_with(2, &[("XENT_TEST_STALL_RANK", stalled)], &args);
        let took = started.elapsed();
        assert_ne!(code, 0, "{mode}: {out} {err}");
        assert!(err.contains("waited 2s for the other ranks"), "{mode}: {err}");
        assert!(took < std::time::Duration::from_secs(60), "{mode}: took {took:?}");
        assert_eq!(dir.files(), ["l.npy", "t.npy"], "{mode}: nothing left behind");
    }
}
