//! The linear head on every path (the reference, the fast CPU path, every GPU adapter)
//! against PyTorch float64 on the committed cases tests/data/linear_* (made by
//! scripts/make_reference.py: `F.linear` then the loss, N from 1 to 700, D from 1 to
//! 512, V from 2 to 32000, bias or not, every class-index option, ignored rows and an
//! all-ignored batch, float16 h/W/b): loss or row losses, dh, dW and db for every
//! reduction. Tolerances: those of tests/linear_gpu.rs (derived from the f32 products of
//! length D, tests/common/head.rs), since PyTorch's float64 answer is exact for the
//! stored inputs.

mod common;

use std::path::{Path, PathBuf};

use common::head::{Head, bounds, check, kappa};
use xent::npy::{self, NpyData};
use xent::{Backend, Gradient, HalfFormat, LinearHead, LossOptions, LossOutput, Problem, Reduction, Values};

/// One case's inputs: f32 values, and the float16 bits when the case stores float16.
struct Case {
    name: String,
    dir: PathBuf,
    head: Head,
    bias: bool,
    half: Option<[Vec<u16>; 3]>,
    opts: LossOptions,
}

/// A float32 or float16 array as f32 (float16 widened exactly), with its bits.
fn values(path: &Path) -> (Vec<f32>, Option<Vec<u16>>) {
    match npy::read(path).unwrap().data {
        NpyData::F32(v) => (v, None),
        NpyData::F16(bits) => (bits.iter().map(|&b| HalfFormat::F16.to_f32(b)).collect(), Some(bits)),
        other => panic!("{}: {other:?}", path.display()),
    }
}

fn f64s(path: &Path) -> Option<Vec<f32>> {
    path.exists().then(|| match npy::read(path).unwrap().data {
        NpyData::F64(v) => v.iter().map(|&x| x as f32).collect(),
        other => panic!("{}: {other:?}", path.display()),
    })
}

fn cases() -> Vec<Case> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("linear_"))
        .collect();
    dirs.sort();
    assert!(
        dirs.len() >= 12,
        "tests/data holds {} linear-head cases; run scripts/make_reference.py",
        dirs.len()
    );
    dirs.into_iter()
        .map(|dir| {
            let shape = npy::read(dir.join("weight.npy")).unwrap().shape;
            let (v, d) = (shape[0], shape[1]);
            let (h, h16) = values(&dir.join("hidden.npy"));
            let (w, w16) = values(&dir.join("weight.npy"));
            let bias = dir.join("bias.npy").exists();
            let (b, b16) = if bias { values(&dir.join("bias.npy")) } else { (vec![0.0; v], None) };
            let NpyData::I64(t) = npy::read(dir.join("targets.npy")).unwrap().data else { panic!("targets") };
            let half = h16.map(|h16| [h16, w16.unwrap(), b16.unwrap_or_default()]);
            Case {
                name: dir.file_name().unwrap().to_string_lossy().into_owned(),
                head: Head { n: t.len(), d, v, h, w, b, t },
                bias,
                half,
                opts: common::case_options(&dir),
                dir,
            }
        })
        .collect()
}

impl Case {
    /// The head as the case stores it (float16 bits for float16 cases).
    fn linear(&self) -> LinearHead<'_> {
        let hd = &self.head;
        let head = match &self.half {
            Some([h, w, _]) => {
                LinearHead::new(Values::Half(h, HalfFormat::F16), Values::Half(w, HalfFormat::F16), hd.d)
            }
            None => LinearHead::new(Values::F32(&hd.h), Values::F32(&hd.w), hd.d),
        };
        match (&self.half, self.bias) {
            (_, false) => head,
            (Some([_, _, b]), true) => head.bias(Values::Half(b, HalfFormat::F16)),
            (None, true) => head.bias(Values::F32(&hd.b)),
        }
    }

    /// PyTorch's outputs for one reduction (gradients where the case stores them).
    fn expected(&self, reduction: Reduction) -> LossOutput {
        let r = reduction.name();
        let file = |what: &str| f64s(&self.dir.join(format!("{what}_{r}.npy")));
        let loss = file("loss").unwrap();
        LossOutput {
            loss: (reduction != Reduction::None).then(|| loss[0]),
            row_losses: (reduction == Reduction::None).then_some(loss),
            grad_hidden: file("grad_hidden"),
            grad_weight: file("grad_weight"),
            grad_bias: file("grad_bias"),
            ..Default::default()
        }
    }
}

/// Every path: the reference, the fast CPU path, every GPU of `common::gpus`.
fn every_path(test: &str) -> Vec<(String, &'static dyn Backend)> {
    [("reference".to_string(), &xent::Reference as &dyn Backend), ("cpu fast".to_string(), &xent::CpuFast)]
        .into_iter()
        .chain(common::gpus(test).iter().map(|g| (common::name(g), g as &dyn Backend)))
        .collect()
}

#[test]
fn every_linear_case_matches_pytorch_on_every_path() {
    let paths = every_path("every_linear_case_matches_pytorch_on_every_path");
    let mut checked = 0;
    for case in cases() {
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let opts = case.opts.clone().reduction(reduction);
            let want = case.expected(reduction);
            let grads = want.grad_hidden.is_some();
            let b = bounds(&case.head, case.bias, &opts, kappa(&case.head, &opts), 1.0);
            for (label, path) in &paths {
                let mut p = Problem::linear(case.linear(), &case.head.t[..]);
                if grads {
                    p = p.gradient(Gradient::Owned);
                }
                let got = path
                    .evaluate(p, &opts)
                    .unwrap_or_else(|e| panic!("{} {reduction:?} on {label}: {e}", case.name));
                let mut got = got;
                // The data holds the total loss (the z-loss part inside it) and no bias
                // gradient without a bias.
                got.z_loss = None;
                if !case.bias {
                    got.grad_bias = None;
                }
                check(label, &got, &want, &case.head, &b, &format!("{} {reduction:?}", case.name));
                checked += 1;
            }
        }
    }
    // 12 cases × 3 reductions on the reference, the fast path and each adapter.
    assert!(checked >= 12 * 3 * 2, "{checked} comparisons");
}

/// The linear head's rows sharded over 2 and 3 paths (the fast CPU path, the reference
/// and the GPUs in turn): every case and reduction against PyTorch at the unsharded
/// tolerances — `dh` side by side, `dW` and `db` summed over the shards (owned, and into
/// the caller's f32 slices).
#[test]
fn row_shards_of_every_linear_case_match_pytorch() {
    let paths = every_path("row_shards_of_every_linear_case_match_pytorch");
    let pick = |k: usize| paths[k % paths.len()].1;
    let sets = [vec![pick(1), pick(2)], vec![pick(2), pick(0), pick(paths.len() - 1)]];
    for set in sets {
        let shards =
            xent::RowShards::new(set.into_iter().map(|p| Box::new(p) as Box<dyn Backend>).collect()).unwrap();
        let label = shards.describe();
        for case in cases() {
            for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
                let opts = case.opts.clone().reduction(reduction);
                let want = case.expected(reduction);
                let b = bounds(&case.head, case.bias, &opts, kappa(&case.head, &opts), 1.0);
                let what = format!("{} {reduction:?}", case.name);
                let (n, d, v) = (case.head.n, case.head.d, case.head.v);
                let (mut dh, mut dw, mut db) =
                    (vec![f32::NAN; n * d], vec![f32::NAN; v * d], vec![f32::NAN; v]);
                for into_slices in [false, true] {
                    let mut p = Problem::linear(case.linear(), &case.head.t[..]);
                    if want.grad_hidden.is_some() {
                        p = p.gradient(if into_slices {
                            Gradient::Linear(xent::HeadGradients {
                                hidden: xent::GradientTo::IntoF32(&mut dh),
                                weight: xent::GradientTo::IntoF32(&mut dw),
                                bias: if case.bias {
                                    xent::GradientTo::IntoF32(&mut db)
                                } else {
                                    xent::GradientTo::Skip
                                },
                            })
                        } else {
                            Gradient::Owned
                        });
                    }
                    let mut got =
                        shards.evaluate(p, &opts).unwrap_or_else(|e| panic!("{what} on {label}: {e}"));
                    if into_slices && want.grad_hidden.is_some() {
                        assert!(got.grad_weight.is_none(), "{what}: dW into the slice, not owned");
                        got.grad_hidden = Some(dh.clone());
                        got.grad_weight = Some(dw.clone());
                        got.grad_bias = case.bias.then(|| db.clone());
                    }
                    got.z_loss = None;
                    if !case.bias {
                        got.grad_bias = None;
                    }
                    check(&label, &got, &want, &case.head, &b, &what);
                }
            }
        }
    }
}

/// The tensor-parallel LM head (`xent::parallel::evaluate_vocab_head`): every case's
/// vocabulary split over 3 ranks of an in-process group, each holding its rows of W and b,
/// on every path (each tile of a shard's logits through the path's vocabulary steps):
/// PyTorch's loss, row losses and gradients at the unsharded tolerances — `dh` summed
/// over the ranks, `dW` and `db` the ranks' rows side by side.
#[test]
fn vocab_shards_of_every_linear_case_match_pytorch() {
    use xent::collective::LocalGroup;
    use xent::parallel::{columns, evaluate_vocab_head};
    use xent::vocab::HeadShard;
    const RANKS: usize = 3;
    let paths = every_path("vocab_shards_of_every_linear_case_match_pytorch");
    let mut checked = 0;
    for case in cases() {
        let (d, v) = (case.head.d, case.head.v);
        for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            let opts = case.opts.clone().reduction(reduction);
            let want = case.expected(reduction);
            let grads = want.grad_hidden.is_some();
            let b = bounds(&case.head, case.bias, &opts, kappa(&case.head, &opts), 1.0);
            for (label, path) in &paths {
                let group = LocalGroup::new(RANKS);
                let outs: Vec<(std::ops::Range<usize>, LossOutput)> = std::thread::scope(|s| {
                    let running: Vec<_> = group
                        .iter()
                        .map(|c| {
                            let (case, opts, path) = (&case, &opts, *path);
                            s.spawn(move || {
                                let cols = columns(c, v);
                                let head = case.linear();
                                let slice = |x, k: usize| part(x, cols.start * k..cols.end * k);
                                let shard = HeadShard {
                                    hidden: head.hidden,
                                    weight: slice(head.weight, d),
                                    bias: head.bias.map(|b| slice(b, 1)),
                                    dim: d,
                                    columns: cols.clone(),
                                    classes: v,
                                };
                                let t = xent::Targets::I64(&case.head.t);
                                (cols.clone(), evaluate_vocab_head(c, path, &shard, t, opts, grads).unwrap())
                            })
                        })
                        .collect();
                    running.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let what = format!("{} {reduction:?} over {RANKS} vocabulary shards", case.name);
                for (_, o) in &outs {
                    let mut got = LossOutput {
                        loss: o.loss,
                        row_losses: o.row_losses.clone().filter(|_| reduction == Reduction::None),
                        grad_hidden: o.grad_hidden.clone(),
                        ..Default::default()
                    };
                    if grads {
                        let mut dw = vec![f32::NAN; v * d];
                        let mut db = vec![f32::NAN; v];
                        for (cols, o) in &outs {
                            dw[cols.start * d..cols.end * d]
                                .copy_from_slice(o.grad_weight.as_deref().unwrap());
                            if case.bias {
                                db[cols.clone()].copy_from_slice(o.grad_bias.as_deref().unwrap());
                            }
                        }
                        got.grad_weight = Some(dw);
                        got.grad_bias = case.bias.then_some(db);
                    }
                    let want = LossOutput {
                        grad_bias: want.grad_bias.clone().filter(|_| case.bias),
                        ..want.clone()
                    };
                    check(label, &got, &want, &case.head, &b, &what);
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 12 * 3 * 2, "{checked} comparisons");
}

/// Elements `r` of `x`.
fn part(x: Values<'_>, r: std::ops::Range<usize>) -> Values<'_> {
    match x {
        Values::F32(x) => Values::F32(&x[r]),
        Values::Half(x, f) => Values::Half(&x[r], f),
    }
}
