//! Conformance: a built-in set of cases, each run on a [`Backend`] and compared with the
//! f64 reference under the f32 tolerances of `shared/docs/semantics.md`. `xent check`
//! prints the table; the tests run the same cases.

use crate::backend::{Backend, Reference};
use crate::error::Error;
use crate::options::{LossOptions, LossOutput, Reduction};
use crate::problem::{Gradient, Labels, Logits, Problem};
use crate::synth;

/// f32 tolerances against the f64 reference.
///
/// Losses: `|got − want| ≤ loss_rtol · |want| + loss_atol`. The absolute floor is the
/// same as the gradient's: a row loss is `log Σ exp(x − max) − (x_t − max)`, and f32
/// cannot resolve `log(1 + δ)` for δ below a few ULP of 1, so a nearly certain row has
/// an absolute, not a relative, error of that size — the same error its gradient
/// `p_t − 1` carries. Gradients: `|got − want| ≤ grad_atol` after the 1/D scaling.
/// NaN must match NaN, and infinities must match exactly.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    /// Relative tolerance of losses.
    pub loss_rtol: f64,
    /// Absolute floor of losses.
    pub loss_atol: f64,
    /// Absolute tolerance of gradients.
    pub grad_atol: f64,
}

impl Tolerance {
    /// The f32 tolerances: loss rtol 1e-5 (floor 1e-6), gradient atol 1e-6.
    pub const F32: Tolerance = Tolerance { loss_rtol: 1e-5, loss_atol: 1e-6, grad_atol: 1e-6 };
}

/// Largest errors seen in a comparison.
#[derive(Clone, Copy, Debug, Default)]
pub struct Agreement {
    /// Largest `|got − want| / (rtol·|want| + atol)` over losses (≤ 1 passes).
    pub loss_ratio: f64,
    /// Largest absolute gradient error.
    pub grad_err: f64,
}

fn same_special(a: f64, b: f64) -> Option<bool> {
    if a.is_nan() || b.is_nan() {
        return Some(a.is_nan() && b.is_nan());
    }
    if a.is_infinite() || b.is_infinite() {
        return Some(a == b);
    }
    None
}

/// Compares `got` with `want` field by field. Every field `want` has must be in `got`.
pub fn compare(got: &LossOutput, want: &LossOutput, tol: Tolerance) -> Result<Agreement, String> {
    let mut agreement = Agreement::default();
    let mut loss_check = |what: &str, g: f32, w: f32| -> Result<(), String> {
        let (g, w) = (f64::from(g), f64::from(w));
        match same_special(g, w) {
            Some(true) => return Ok(()),
            Some(false) => return Err(format!("{what}: got {g}, want {w}")),
            None => {}
        }
        let ratio = (g - w).abs() / (tol.loss_rtol * w.abs() + tol.loss_atol);
        agreement.loss_ratio = agreement.loss_ratio.max(ratio);
        if ratio > 1.0 {
            return Err(format!("{what}: got {g}, want {w} (error {:.3e})", (g - w).abs()));
        }
        Ok(())
    };
    match (got.loss, want.loss) {
        (Some(g), Some(w)) => loss_check("loss", g, w)?,
        (None, None) => {}
        (g, w) => return Err(format!("loss: got {g:?}, want {w:?}")),
    }
    let pairs = [("row loss", &got.row_losses, &want.row_losses), ("lse", &got.lse, &want.lse)];
    for (what, g, w) in pairs {
        match (g, w) {
            (Some(g), Some(w)) => {
                if g.len() != w.len() {
                    return Err(format!("{what}: got {} values, want {}", g.len(), w.len()));
                }
                for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
                    loss_check(&format!("{what} of row {i}"), a, b)?;
                }
            }
            (_, None) => {}
            (None, Some(_)) => return Err(format!("{what}: missing")),
        }
    }
    match (&got.gradient, &want.gradient) {
        (Some(g), Some(w)) => {
            if g.len() != w.len() {
                return Err(format!("gradient: got {} values, want {}", g.len(), w.len()));
            }
            for (i, (&a, &b)) in g.iter().zip(w).enumerate() {
                let (a, b) = (f64::from(a), f64::from(b));
                match same_special(a, b) {
                    Some(true) => continue,
                    Some(false) => return Err(format!("gradient[{i}]: got {a}, want {b}")),
                    None => {}
                }
                let err = (a - b).abs();
                agreement.grad_err = agreement.grad_err.max(err);
                if err > tol.grad_atol {
                    return Err(format!("gradient[{i}]: got {a}, want {b} (error {err:.3e})"));
                }
            }
        }
        (_, None) => {}
        (None, Some(_)) => return Err("gradient: missing".into()),
    }
    Ok(agreement)
}

/// One conformance case.
#[derive(Clone, Debug)]
pub struct Case {
    /// Short name shown in the table.
    pub name: String,
    /// Number of classes V.
    pub classes: usize,
    /// Logits [rows, classes].
    pub logits: Vec<f32>,
    /// Targets \[rows\].
    pub targets: Vec<i64>,
    /// Options.
    pub opts: LossOptions,
    /// Ask for the gradient (owned).
    pub gradient: bool,
    /// Ask for the row losses and the LSE.
    pub rows_too: bool,
    /// Ask for the gradient in place (it overwrites the logits).
    pub in_place: bool,
}

impl Case {
    fn new(name: &str, rows: usize, classes: usize, scale: f64, seed: u64) -> Self {
        Self {
            name: name.into(),
            classes,
            logits: synth::logits(rows, classes, scale, seed),
            targets: synth::targets(rows, classes, seed),
            opts: LossOptions::new(),
            gradient: false,
            rows_too: false,
            in_place: false,
        }
    }
    fn opts(mut self, opts: LossOptions) -> Self {
        self.opts = opts;
        self
    }
    fn grad(mut self) -> Self {
        self.gradient = true;
        self
    }
    fn rows_too(mut self) -> Self {
        self.rows_too = true;
        self
    }
    fn in_place(mut self) -> Self {
        self.in_place = true;
        self
    }
    fn edit(mut self, f: impl FnOnce(&mut Vec<f32>, &mut Vec<i64>)) -> Self {
        f(&mut self.logits, &mut self.targets);
        self
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.targets.len()
    }

    /// Runs the case on `backend` (the in-place gradient is returned in `gradient`).
    pub fn run(&self, backend: &dyn Backend) -> crate::Result<LossOutput> {
        let labels = Labels::from(&self.targets);
        if self.in_place {
            let mut logits = self.logits.clone();
            let problem = Problem::new(Logits::F32Mut(&mut logits), self.classes, labels)
                .gradient(Gradient::InPlace)
                .row_losses(self.rows_too)
                .lse(self.rows_too);
            let mut out = backend.evaluate(problem, &self.opts)?;
            out.gradient = Some(logits);
            Ok(out)
        } else {
            let problem = Problem::new(Logits::F32(&self.logits), self.classes, labels)
                .gradient(if self.gradient { Gradient::Owned } else { Gradient::None })
                .row_losses(self.rows_too)
                .lse(self.rows_too);
            backend.evaluate(problem, &self.opts)
        }
    }

    /// Runs the case on `backend` and on the reference and compares them.
    pub fn verify(&self, backend: &dyn Backend) -> Result<Agreement, String> {
        let want = self.run(&Reference);
        let got = self.run(backend);
        match (got, want) {
            (Ok(g), Ok(w)) => compare(&g, &w, Tolerance::F32),
            (Err(g), Err(w)) if std::mem::discriminant(&g) == std::mem::discriminant(&w) => {
                Ok(Agreement::default())
            }
            (Err(g), Err(w)) => Err(format!("error differs: got '{g}', want '{w}'")),
            (Err(g), Ok(_)) => Err(format!("failed: {g}")),
            (Ok(_), Err(w)) => Err(format!("should have failed with '{w}'")),
        }
    }

    /// The error the reference gives, if the case is meant to fail.
    pub fn expected_error(&self) -> Option<Error> {
        self.run(&Reference).err()
    }
}

/// The built-in conformance set: every reduction, ignore_index (default and a valid
/// class), separate and in-place gradients, masking, offsets, non-finite rows, sizes
/// that are not multiples of the workgroup, rows beyond one dispatch dimension, long
/// rows, an empty batch and a bad target.
pub fn conformance_cases() -> Vec<Case> {
    let with = |r: Reduction| LossOptions::new().reduction(r);
    vec![
        Case::new("1x1 (V=1: loss 0)", 1, 1, 1.0, 1).grad(),
        Case::new("3x5 mean", 3, 5, 1.0, 2).rows_too(),
        Case::new("257x1000 sum", 257, 1000, 2.0, 3).opts(with(Reduction::Sum)).rows_too(),
        Case::new("100x77 none", 100, 77, 3.0, 4).opts(with(Reduction::None)),
        Case::new("ignore -100 mean+grad", 64, 300, 2.0, 5)
            .grad()
            .edit(|_, t| t.iter_mut().step_by(3).for_each(|x| *x = -100)),
        Case::new("ignore class 3 sum+grad", 64, 10, 2.0, 6)
            .opts(with(Reduction::Sum).ignore_index(3))
            .grad(),
        Case::new("all ignored mean (NaN)", 8, 16, 1.0, 7)
            .grad()
            .edit(|_, t| t.iter_mut().for_each(|x| *x = -100)),
        Case::new("in-place grad mean", 33, 4099, 2.0, 8).in_place(),
        Case::new("in-place grad none", 17, 513, 2.0, 9).opts(with(Reduction::None)).in_place(),
        Case::new("-inf masked vocab", 40, 1000, 2.0, 10).grad().rows_too().edit(|l, t| {
            for (r, row) in l.chunks_mut(1000).enumerate() {
                let keep = t[r] as usize;
                for (c, x) in row.iter_mut().enumerate() {
                    if c % 3 != 0 && c != keep {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }),
        Case::new("offset +1e4", 32, 2000, 3.0, 11)
            .grad()
            .rows_too()
            .edit(|l, _| l.iter_mut().for_each(|x| *x += 1e4)),
        Case::new("spread x1000", 32, 2000, 1000.0, 12).grad().rows_too(),
        Case::new("NaN/+inf/-inf rows", 6, 50, 1.0, 13).opts(with(Reduction::None)).grad().edit(|l, t| {
            l[0] = f32::NAN;
            l[50 + 7] = f32::INFINITY;
            l[100..150].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
            let target = t[3] as usize;
            l[150 + target] = f32::NEG_INFINITY;
        }),
        Case::new("70000x8 (rows > 65535)", 70000, 8, 2.0, 14).grad().rows_too(),
        Case::new("2x131072", 2, 131072, 2.0, 15).grad().rows_too(),
        Case::new("empty batch mean", 0, 10, 1.0, 16).grad(),
        Case::new("empty batch sum", 0, 10, 1.0, 17).opts(with(Reduction::Sum)),
        Case::new("bad target (error)", 5, 10, 1.0, 18).edit(|_, t| t[2] = 10),
    ]
}
