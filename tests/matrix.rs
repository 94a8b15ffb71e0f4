//! The support matrix: every cell ({f32, f16, bf16} × {class indices, probabilities,
//! binary} × {loss, gradient owned / into f32 / into the input's type / in place,
//! backward}) on every path — the reference, the fast CPU path and every adapter — gives
//! the f64 reference's result on the same (widened) values, under several option sets,
//! an even and an odd number of classes, and row blocks small enough that the front
//! door's composition crosses block boundaries. A cell may instead answer
//! `Error::Unsupported`; the test lists those and fails unless the list is the one
//! README documents (empty today).

mod common;

use common::Fixture;

use xent::{
    Backend, Cell, Dtype, Error, Gradient, HalfFormat, Input, LabelKind, Labels, Logits, LossOptions,
    LossOutput, Output, Problem, Reduction,
};

impl Fixture {
    fn labels(&self, kind: LabelKind) -> Labels<'_> {
        match kind {
            LabelKind::Classes => Labels::from(&self.targets),
            LabelKind::Probabilities => Labels::Probabilities(&self.probs),
            LabelKind::Binary => Labels::Binary(&self.binary),
        }
    }
}

/// The option sets of a label kind: the plain loss and the options that apply to it.
fn option_sets(kind: LabelKind, classes: usize) -> Vec<LossOptions> {
    let weights: Vec<f32> = (0..classes).map(|c| 0.25 + (c % 4) as f32 * 0.5).collect();
    match kind {
        LabelKind::Classes => vec![
            LossOptions::new(),
            // The z-loss part divides by the counted rows, the cross-entropy part by Σ w_y.
            LossOptions::new().weights(weights.clone()).label_smoothing(0.1).z_loss(1e-3),
            LossOptions::new().reduction(Reduction::Sum).softcap(5.0).logit_scale(1.5),
            LossOptions::new().reduction(Reduction::None).weights(weights).z_loss(1e-2),
        ],
        LabelKind::Probabilities => vec![
            LossOptions::new(),
            LossOptions::new().reduction(Reduction::Sum).weights(weights).label_smoothing(0.1).z_loss(1e-3),
            LossOptions::new().reduction(Reduction::None).softcap(5.0),
        ],
        LabelKind::Binary => vec![
            LossOptions::new(),
            LossOptions::new().reduction(Reduction::Sum).weights(weights.clone()).pos_weight(weights),
            LossOptions::new().reduction(Reduction::None),
        ],
    }
}

/// What a cell produced: the output and the gradient as f32 (None for the loss only).
type Produced = (LossOutput, Option<Vec<f32>>);

/// Runs `cell` of `fixture` on `backend`.
fn run(backend: &dyn Backend, cell: Cell, f: &Fixture, opts: &LossOptions) -> xent::Result<Produced> {
    let format = cell.dtype.half();
    let v = f.classes;
    let labels = f.labels(cell.labels);
    let mut logits32 = f.logits.clone();
    let mut bits = f.bits.clone();
    let mut into32 = vec![f32::NAN; f.logits.len()];
    let mut into16 = vec![0u16; f.logits.len()];
    let lse = saved_lse(f, cell.labels, opts);
    let logits = match (format, cell.output) {
        (None, Output::InPlace) => Logits::F32Mut(&mut logits32),
        (None, _) => Logits::F32(&logits32),
        (Some(h), Output::InPlace) => Logits::HalfMut(&mut bits, h),
        (Some(h), _) => Logits::Half(&bits, h),
    };
    let problem = Problem::new(logits, v, labels).row_losses(true).lse(cell.labels != LabelKind::Binary);
    let problem = match cell.output {
        Output::Loss => problem,
        Output::Owned => problem.gradient(Gradient::Owned),
        Output::IntoF32 => problem.gradient(Gradient::IntoF32(&mut into32)),
        Output::IntoHalf => problem.gradient(Gradient::IntoHalf(&mut into16)),
        Output::InPlace => problem.gradient(Gradient::InPlace),
        Output::Backward => Problem { row_losses: false, lse: false, ..problem }
            .gradient(Gradient::IntoF32(&mut into32))
            .backward(lse.as_deref(), f.upstream(cell.labels, opts.get_reduction())),
    };
    let mut out = backend.evaluate(problem, opts)?;
    let widen = |b: &[u16]| -> Vec<f32> { b.iter().map(|&x| format.unwrap().to_f32(x)).collect() };
    let grad = match cell.output {
        Output::Loss => None,
        Output::Owned => out.gradient.take(),
        Output::IntoF32 | Output::Backward => Some(into32),
        Output::IntoHalf => Some(widen(&into16)),
        Output::InPlace => Some(if format.is_some() { widen(&bits) } else { logits32 }),
    };
    Ok((out, grad))
}

/// The LSE a forward saved (the reference's, rounded to f32), for the cross-entropy kinds.
fn saved_lse(f: &Fixture, kind: LabelKind, opts: &LossOptions) -> Option<Vec<f32>> {
    if kind == LabelKind::Binary {
        return None;
    }
    let problem = Problem::new(Logits::F32(&f.logits), f.classes, f.labels(kind)).lse(true);
    xent::Reference.evaluate(problem, opts).unwrap().lse
}

/// The f64 reference on the widened values, computed directly (not composed).
fn expected(cell: Cell, f: &Fixture, opts: &LossOptions) -> Produced {
    let exact = Cell {
        dtype: Dtype::F32,
        output: if cell.output == Output::Backward { Output::Backward } else { Output::IntoF32 },
        ..cell
    };
    let mut out = run(&xent::Reference, exact, f, opts).unwrap();
    if cell.output == Output::Loss {
        out.1 = None;
    }
    out
}

fn close(got: f32, want: f32, rtol: f32, atol: f32) -> bool {
    (got.is_nan() && want.is_nan()) || got == want || (got - want).abs() <= rtol * want.abs() + atol
}

/// Compares a cell's result with the reference's; the gradient under the tolerance of
/// its destination type.
fn compare(cell: Cell, got: &Produced, want: &Produced) -> Result<(), String> {
    let (g, w) = (&got.0, &want.0);
    let loss = |a: Option<f32>, b: Option<f32>, what: &str| -> Result<(), String> {
        match (a, b) {
            (Some(a), Some(b)) if close(a, b, 1e-5, 1e-6) => Ok(()),
            (None, None) => Ok(()),
            (a, b) => Err(format!("{what}: got {a:?}, want {b:?}")),
        }
    };
    loss(g.loss, w.loss, "loss")?;
    loss(g.z_loss, w.z_loss, "z_loss")?;
    for (what, a, b) in [("row losses", &g.row_losses, &w.row_losses), ("lse", &g.lse, &w.lse)] {
        match (a, b) {
            (Some(a), Some(b)) if a.len() == b.len() => {
                if let Some(i) = (0..a.len()).find(|&i| !close(a[i], b[i], 1e-5, 1e-6)) {
                    return Err(format!("{what}[{i}]: got {}, want {}", a[i], b[i]));
                }
            }
            (None, None) => {}
            (a, b) => {
                return Err(format!(
                    "{what}: got {:?} values, want {:?}",
                    a.as_ref().map(Vec::len),
                    b.as_ref().map(Vec::len)
                ));
            }
        }
    }
    let half_out = matches!(cell.output, Output::IntoHalf | Output::InPlace) && cell.dtype != Dtype::F32;
    let (rtol, atol) = match (half_out, cell.dtype) {
        (false, _) => (0.0, 1e-6),
        (true, Dtype::Bf16) => (1.6e-2, 1e-5),
        (true, _) => (1e-3, 1e-5),
    };
    match (&got.1, &want.1) {
        (Some(a), Some(b)) => {
            if let Some(i) = (0..a.len()).find(|&i| !close(a[i], b[i], rtol, atol)) {
                return Err(format!("gradient[{i}]: got {}, want {}", a[i], b[i]));
            }
        }
        (None, None) => {}
        (a, _) => return Err(format!("gradient: got {}", if a.is_some() { "one" } else { "none" })),
    }
    Ok(())
}

/// Walks every cell on `backend`; returns the unsupported cells and the failures.
fn walk(backend: &dyn Backend) -> (Vec<String>, Vec<String>) {
    let (mut unsupported, mut failures) = (Vec::new(), Vec::new());
    let mut checked = 0;
    for cell in Cell::all() {
        for (rows, classes) in [(37, 50), (29, 33)] {
            let f = Fixture::new(rows, classes, cell.dtype, 11 + classes as u64);
            for opts in option_sets(cell.labels, classes) {
                let want = expected(cell, &f, &opts);
                match run(backend, cell, &f, &opts) {
                    Ok(got) => {
                        checked += 1;
                        if let Err(e) = compare(cell, &got, &want) {
                            failures.push(format!("{cell} ({rows}x{classes}, {opts:?}): {e}"));
                        }
                    }
                    Err(Error::Unsupported { cell: c, why, .. }) => {
                        let line = format!("{cell}: {c} ({why})");
                        if !unsupported.contains(&line) {
                            unsupported.push(line);
                        }
                    }
                    Err(e) => failures.push(format!("{cell} ({rows}x{classes}, {opts:?}): error {e}")),
                }
            }
        }
    }
    assert!(checked > 0, "{}: no cell ran", backend.describe());
    eprintln!("{}: {checked} evaluations against the reference", backend.describe());
    (unsupported, failures)
}

fn assert_whole_matrix(backend: &dyn Backend) {
    // Row blocks of 3 or 4 rows: the composition crosses block boundaries.
    xent::set_block_elems(150);
    let (unsupported, failures) = walk(backend);
    assert!(
        failures.is_empty(),
        "{}: {} failures:\n{}",
        backend.describe(),
        failures.len(),
        failures.join("\n")
    );
    assert!(unsupported.is_empty(), "{}: unsupported cells:\n{}", backend.describe(), unsupported.join("\n"));
}

#[test]
fn every_cell_on_the_reference() {
    assert_whole_matrix(&xent::Reference);
}

#[test]
fn every_cell_on_the_fast_cpu_path() {
    assert_whole_matrix(&xent::CpuFast);
}

#[test]
fn every_cell_on_every_adapter() {
    for gpu in common::gpus("every_cell_on_every_adapter") {
        assert_whole_matrix(gpu);
    }
}

#[test]
fn cells_of_the_matrix() {
    let cells = Cell::all();
    // 3 types × 3 label kinds × 6 outputs, less the half destination of f32 logits.
    assert_eq!(cells.len(), 3 * 3 * 6 - 3);
    let text = Cell {
        input: Input::Logits,
        dtype: Dtype::F16,
        labels: LabelKind::Probabilities,
        output: Output::InPlace,
    }
    .to_string();
    assert_eq!(text, "float16 logits × probability targets × gradient in place");
    let _ = HalfFormat::F16;
}
