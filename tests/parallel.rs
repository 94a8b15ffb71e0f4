//! Sharded evaluation over an in-process group of ranks (`xent::collective::LocalGroup`,
//! `xent::parallel`): the metrics from merged vocabulary partials equal the unsharded
//! ones, and a failing, absent or panicking rank makes every rank return an error at once
//! instead of waiting. (Loss and gradient against PyTorch: tests/pytorch_reference.rs.)

mod common;

use std::time::{Duration, Instant};

use xent::collective::{Collective, LocalGroup, Wire, agree};
use xent::parallel::{columns, evaluate_rows, evaluate_vocab, rows};
use xent::vocab::{ColumnShard, VocabPartial};
use xent::{Backend, CpuFast, Error, Labels, Logits, LossOptions, MetricsSpec, Problem, Reference, Targets};

/// Logits in [-4, 4) from a fixed LCG.
fn logits(n: usize, v: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n * v)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect()
}

/// Runs `f` on every rank of a group of `ranks`, one thread each; the results in rank order.
fn on_ranks<T: Send>(ranks: usize, f: impl Fn(&LocalGroup) -> T + Sync) -> Vec<T> {
    let group = LocalGroup::new(ranks);
    std::thread::scope(|s| {
        let running: Vec<_> = group.iter().map(|c| s.spawn(|| f(c))).collect();
        running.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn same(a: f64, b: f64, tol: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol
}

/// Metrics from partials merged over 1, 2, 3 and 7 ranks, on the reference, the fast CPU
/// path and every GPU, against the unsharded reference: the counts exactly, the means within 1e-5
/// (f32 row statistics), NaN where the unsharded ones are NaN.
#[test]
fn vocab_metrics_from_merged_partials_match_the_unsharded_ones() {
    let (n, v) = (41, 67);
    let mut x = logits(n, v, 7);
    x[5 * v..5 * v + v / 2].fill(f32::NEG_INFINITY); // half a row masked
    x[9 * v + 3] = x[9 * v + 40]; // a tie
    let mut targets: Vec<i64> = (0..n as i64).map(|r| (r * 13) % v as i64).collect();
    targets[2] = -100;
    targets[9] = 40;
    let spec = MetricsSpec::new().top_k(&[1, 3, 10]).ece_bins(7);
    let option_sets = [
        LossOptions::new().metrics(spec.clone()),
        LossOptions::new().metrics(spec.clone()).softcap(3.0).logit_scale(1.5).label_smoothing(0.2),
    ];
    let mut with_nan = x.clone();
    with_nan[17 * v + 60] = f32::NAN;
    for (logits, nan) in [(&x, false), (&with_nan, true)] {
        for opts in &option_sets {
            let want = Reference.cross_entropy_metrics(logits, v, &targets, opts);
            for ranks in [1, 2, 3, 7] {
                let gpus = common::gpus("vocab_metrics_from_merged_partials_match_the_unsharded_ones");
                let paths = [&Reference as &dyn Backend, &CpuFast]
                    .into_iter()
                    .chain(gpus.iter().map(|g| g as &dyn Backend));
                for path in paths {
                    let got = on_ranks(ranks, |c| {
                        let cols = columns(c, v);
                        let mine: Vec<f32> =
                            logits.chunks(v).flat_map(|r| r[cols.clone()].to_vec()).collect();
                        let shard = ColumnShard::new(&mine, cols, v);
                        evaluate_vocab(c, path, shard, Targets::I64(&targets), opts, None)
                            .unwrap()
                            .metrics
                            .unwrap()
                    });
                    let what = format!("{} over {ranks} ranks (NaN row: {nan})", path.describe());
                    for m in &got {
                        assert_eq!(m.counted_rows, want.counted_rows, "{what}");
                        assert_eq!(m.accuracy, want.accuracy, "{what}: accuracy");
                        assert_eq!(m.top_k_accuracy, want.top_k_accuracy, "{what}: top-k");
                        for (name, a, b) in [
                            ("nll", m.nll, want.nll),
                            ("entropy", m.entropy, want.entropy),
                            ("ece", m.ece, want.ece),
                        ] {
                            assert!(same(a, b, 1e-5), "{what}: {name} {a} vs {b}");
                        }
                        assert_eq!(m.nll.is_nan(), nan, "{what}: a NaN row makes the mean nll NaN");
                    }
                }
            }
        }
    }
}

trait MetricsOf {
    fn cross_entropy_metrics(&self, logits: &[f32], v: usize, t: &[i64], opts: &LossOptions)
    -> xent::Metrics;
}

impl MetricsOf for Reference {
    fn cross_entropy_metrics(
        &self,
        logits: &[f32],
        v: usize,
        t: &[i64],
        opts: &LossOptions,
    ) -> xent::Metrics {
        let problem = Problem::new(Logits::F32(logits), v, Labels::from(t));
        self.evaluate(problem, opts).unwrap().metrics.unwrap()
    }
}

/// A partial travels in 2 words (the state, the target), 3 with label smoothing, 4 or 5
/// with the metrics, and comes back as it went.
#[test]
fn partials_travel_in_two_to_five_words_and_come_back_whole() {
    let opts = LossOptions::new().label_smoothing(0.1).metrics(MetricsSpec::new());
    let x = logits(3, 11, 3);
    let shard = ColumnShard::new(&x[..], 0..11, 11);
    let parts = Reference.vocab_partials(shard, Targets::I64(&[4, -100, 10]), &opts).unwrap();
    let wire = Wire::of(&opts);
    assert_eq!(
        (
            Wire::of(&LossOptions::new()).words(),
            Wire::of(&LossOptions::new().label_smoothing(0.1)).words(),
            wire.words()
        ),
        (2, 3, 5)
    );
    for p in &parts {
        let mut w = Vec::new();
        wire.pack(p, &mut w);
        assert_eq!(w.len(), 5);
        assert_eq!(wire.unpack(&w), *p);
    }
    assert_eq!(parts[1].target, None);
    assert!(parts[0].target.is_some() && parts[2].target.is_some());
    let _ = VocabPartial::EMPTY;
}

/// A rank whose rows hold a bad target fails with the typed error, naming the row of the
/// whole batch; every other rank returns `Error::Peer` naming that rank, at the same step.
#[test]
fn a_rank_with_bad_input_fails_every_rank() {
    let (n, v) = (30, 9);
    let x = logits(n, v, 11);
    let mut targets: Vec<i64> = (0..n as i64).map(|r| r % v as i64).collect();
    targets[25] = 99; // rows 20..30 are rank 2's of 3
    let opts = LossOptions::new();
    let started = Instant::now();
    let by_rows = on_ranks(3, |c| {
        let r = rows(c, n);
        let block = Problem::new(
            Logits::F32(&x[r.start * v..r.end * v]),
            v,
            Labels::Classes(Targets::I64(&targets[r.clone()])),
        );
        evaluate_rows(c, &CpuFast, block, &opts)
    });
    for (rank, out) in by_rows.iter().enumerate() {
        match (rank, out) {
            (2, Err(Error::TargetOutOfRange { row: 25, value: 99, .. })) => {}
            (0 | 1, Err(e @ Error::Peer { rank: 2, bad_input: true, .. })) => {
                assert!(e.to_string().contains("row 25"), "{e}");
                assert!(e.is_bad_input());
            }
            other => panic!("rows, rank {rank}: {other:?}"),
        }
    }
    // By columns every rank holds all targets: all fail alike, with the typed error.
    let by_cols = on_ranks(3, |c| {
        let cols = columns(c, v);
        let mine: Vec<f32> = x.chunks(v).flat_map(|r| r[cols.clone()].to_vec()).collect();
        evaluate_vocab(c, &CpuFast, ColumnShard::new(&mine, cols, v), Targets::I64(&targets), &opts, None)
    });
    for out in &by_cols {
        assert!(matches!(out, Err(Error::TargetOutOfRange { row: 25, .. })), "{out:?}");
    }
    // A path that is not a vocabulary shard (here, on rank 1 only) fails every rank.
    struct RowsOnly;
    impl Backend for RowsOnly {
        fn describe(&self) -> String {
            "rows only".into()
        }
        fn evaluate(&self, p: Problem<'_>, o: &LossOptions) -> xent::Result<xent::LossOutput> {
            CpuFast.evaluate(p, o)
        }
    }
    targets[25] = 1;
    let mixed = on_ranks(3, |c| {
        let cols = columns(c, v);
        let mine: Vec<f32> = x.chunks(v).flat_map(|r| r[cols.clone()].to_vec()).collect();
        let path: &dyn Backend = if c.rank() == 1 { &RowsOnly } else { &CpuFast };
        evaluate_vocab(c, path, ColumnShard::new(&mine, cols, v), Targets::I64(&targets), &opts, None)
    });
    assert!(matches!(mixed[1], Err(Error::Unsupported { .. })), "{:?}", mixed[1]);
    for rank in [0, 2] {
        assert!(
            matches!(mixed[rank], Err(Error::Peer { rank: 1, bad_input: false, .. })),
            "{:?}",
            mixed[rank]
        );
    }
    assert!(started.elapsed() < Duration::from_secs(60), "the failures took {:?}", started.elapsed());
}

/// Shards that do not tile the vocabulary are refused on every rank.
#[test]
fn shards_that_do_not_tile_the_vocabulary_are_refused() {
    let (n, v) = (4, 10);
    let x = logits(n, v, 5);
    let targets = [1i64, 2, 3, 4];
    let outs = on_ranks(2, |c| {
        let cols = if c.rank() == 0 { 0..4 } else { 5..10 }; // column 4 missing
        let mine: Vec<f32> = x.chunks(v).flat_map(|r| r[cols.clone()].to_vec()).collect();
        evaluate_vocab(
            c,
            &CpuFast,
            ColumnShard::new(&mine, cols, v),
            Targets::I64(&targets),
            &LossOptions::new(),
            None,
        )
    });
    for o in outs {
        let e = o.unwrap_err();
        assert!(matches!(e, Error::InvalidOption(_)) && e.to_string().contains("tile"), "{e}");
    }
}

/// A rank that never arrives: the others fail after the bounded wait, with the ranks that
/// are missing, and the group stays failed.
#[test]
fn a_rank_that_never_arrives_fails_the_wait_in_bounded_time() {
    let group = LocalGroup::with_timeout(3, Duration::from_millis(300));
    let started = Instant::now();
    let outs: Vec<_> = std::thread::scope(|s| {
        let running: Vec<_> =
            group[..2].iter().map(|c| s.spawn(|| c.all_gather(&[c.rank() as u64]))).collect();
        running.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(started.elapsed() < Duration::from_secs(10));
    for o in outs {
        let e = o.unwrap_err();
        assert!(matches!(e, Error::Collective(_)) && e.to_string().contains("[2]"), "{e}");
    }
    assert!(matches!(group[2].all_gather(&[2]), Err(Error::Collective(_))));
}

/// A rank whose thread panics leaves the group: the others fail at once, long before
/// their wait runs out.
#[test]
fn a_panicking_rank_fails_the_others_at_once() {
    let group = LocalGroup::with_timeout(2, Duration::from_secs(120));
    let started = Instant::now();
    let mut members = group.into_iter();
    let (zero, one) = (members.next().unwrap(), members.next().unwrap());
    let waiting = std::thread::spawn(move || zero.all_gather(&[0]));
    let dying = std::thread::spawn(move || {
        let _held = one;
        std::thread::sleep(Duration::from_millis(100));
        panic!("a rank's device fell over");
    });
    assert!(dying.join().is_err());
    let e = waiting.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("rank 1 left the group"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(30), "{:?}", started.elapsed());
}

/// `agree` hands every rank the same verdict, its own error to the rank that failed.
#[test]
fn agree_gives_every_rank_the_first_failure() {
    let outs = on_ranks(4, |c| {
        let mine: xent::Result<usize> = match c.rank() {
            1 => Err(Error::DeviceLost("rank one's".into())),
            3 => Err(Error::InvalidOption("rank three's".into())),
            r => Ok(r),
        };
        agree(c, mine)
    });
    assert!(matches!(&outs[1], Err(Error::DeviceLost(_))));
    assert!(matches!(&outs[3], Err(Error::InvalidOption(_))));
    for r in [0, 2] {
        match &outs[r] {
            Err(e @ Error::Peer { rank: 1, bad_input: false, .. }) => {
                assert!(e.to_string().contains("rank one's"))
            }
            other => panic!("rank {r}: {other:?}"),
        }
    }
    assert!(on_ranks(3, |c| agree(c, Ok(c.rank()))).into_iter().enumerate().all(|(r, o)| o.unwrap() == r));
}

/// The GPU's shards through a device with a 64 KiB binding and 7 workgroups a dimension:
/// rows wider than a binding cut into pieces (whose entries combine in column order), and
/// narrow shards in many chunks of rows, with class weights and label smoothing — the same
/// loss, LSE, metrics and gradient as the reference's shards.
#[test]
fn gpu_vocab_shards_stream_through_tiny_limits() {
    use xent::check::{Tolerance, compare};
    let Some(mut gpu) = common::tiny_device(common::gpus("gpu_vocab_shards_stream_through_tiny_limits"))
    else {
        return;
    };
    gpu.set_memory_budget(300_000);
    let spec = MetricsSpec::new().top_k(&[1, 4]);
    let cases = [
        // (rows, classes, shards, options): split rows, then chunks of rows.
        (5, 40_000, 2, LossOptions::new().label_smoothing(0.1).metrics(spec.clone())),
        (
            300,
            90,
            3,
            LossOptions::new()
                .label_smoothing(0.2)
                .weights((0..90).map(|c| 0.5 + (c % 5) as f32).collect())
                .metrics(spec.clone()),
        ),
        (300, 90, 3, LossOptions::new().softcap(4.0).z_loss(1e-3).reduction(xent::Reduction::Sum)),
    ];
    for (n, v, parts, opts) in cases {
        let x = logits(n, v, 29);
        let targets: Vec<i64> =
            (0..n as i64).map(|r| if r % 11 == 3 { -100 } else { (r * 7919) % v as i64 }).collect();
        let t = || Targets::I64(&targets);
        let cuts: Vec<std::ops::Range<usize>> =
            (0..parts).map(|k| v * k / parts..v * (k + 1) / parts).collect();
        let shards: Vec<Vec<f32>> =
            cuts.iter().map(|c| x.chunks(v).flat_map(|r| r[c.clone()].to_vec()).collect()).collect();
        let run = |path: &dyn Backend| {
            let mut merged = vec![VocabPartial::EMPTY; n];
            for (c, l) in cuts.iter().zip(&shards) {
                let p = path.vocab_partials(ColumnShard::new(l, c.clone(), v), t(), &opts).unwrap();
                merged.iter_mut().zip(p).for_each(|(m, p)| *m = m.combine(p));
            }
            let mut out = xent::vocab::finish(&merged, t(), v, &opts).unwrap();
            let zt = xent::vocab::target_logits(&merged);
            let mut above = vec![0u64; n];
            let mut grad = vec![f32::NAN; n * v];
            for (c, l) in cuts.iter().zip(&shards) {
                let shard = || ColumnShard::new(l, c.clone(), v);
                if opts.get_metrics().is_some() {
                    let a = path.vocab_above(shard(), t(), &zt, &opts).unwrap();
                    above.iter_mut().zip(a).for_each(|(s, a)| *s += a);
                }
                let mut g = vec![f32::NAN; l.len()];
                let st = xent::vocab::states(&merged);
                path.vocab_gradient(shard(), t(), &st, xent::Upstream::Scalar(1.0), &opts, &mut g).unwrap();
                for (row, part) in grad.chunks_mut(v).zip(g.chunks(c.len())) {
                    row[c.clone()].copy_from_slice(part);
                }
            }
            out.gradient = Some(grad);
            if opts.get_metrics().is_some() {
                out.metrics = Some(xent::vocab::metrics(&merged, &above, t(), &opts).unwrap());
            }
            out
        };
        let want = run(&Reference);
        let got = run(&gpu);
        let what = format!("{n} × {v} over {parts} shards");
        let strip = |o: &xent::LossOutput| xent::LossOutput { metrics: None, ..o.clone() };
        compare(&strip(&got), &strip(&want), Tolerance::F32).unwrap_or_else(|e| panic!("{what}: {e}"));
        if let (Some(a), Some(b)) = (&got.metrics, &want.metrics) {
            assert_eq!(
                (a.counted_rows, a.accuracy, &a.top_k_accuracy),
                (b.counted_rows, b.accuracy, &b.top_k_accuracy),
                "{what}"
            );
            for (name, x, y) in
                [("nll", a.nll, b.nll), ("entropy", a.entropy, b.entropy), ("ece", a.ece, b.ece)]
            {
                assert!(same(x, y, 1e-5), "{what}: {name} {x} vs {y}");
            }
        }
    }
    // Class weights longer than a binding cannot be bound: a typed error, not a wrong sum.
    let (n, v) = (2, 20_000);
    let x = logits(n, v, 3);
    let opts = LossOptions::new().weights(vec![1.0; v]);
    let e = gpu.vocab_partials(ColumnShard::new(&x[..], 0..v, v), Targets::I64(&[1, 2]), &opts).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
}
