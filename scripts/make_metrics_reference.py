#!/usr/bin/env python3
"""Regenerate tests/data/metrics_*: float64 reference figures for the evaluation metrics
(shared/docs/semantics.md, "Evaluation metrics"), computed with scikit-learn, PyTorch and
numpy from the stored float32 logits widened to float64.

Usage: python3 scripts/make_metrics_reference.py   (needs numpy, scikit-learn, torch;
not crate deps). Only the metrics_* folders are rewritten; the other cases in tests/data
are left alone. (Note: scripts/make_reference.py clears all of tests/data, so run this
script after it.)

Each case is a folder tests/data/metrics_<name>/ with
- logits.npy  float32 [N, V], C order (the raw logits x, before logit scale / softcap);
- targets.npy int64 [N] (class indices, ignore_index marks ignored rows), or
  probs.npy   float32 [N, V] (probability targets, rows summing to 1; target = argmax
  of the row, unique per row; ignore_index does not apply);
- metrics.json with the keys
    description, top_k, ece_bins, ignore_index, softcap, logit_scale,
    accuracy, top_k_accuracy {"k": ...}, nll, perplexity, entropy, ece,
    counted_rows, pred [per row, also for ignored rows; -1 for a row holding a NaN],
    sources {figure: library that gave it}, cross_checks {figure: {other source: value}}.
  softcap / logit_scale are null when not used; else z = softcap * tanh(logit_scale * x
  / softcap) (logit_scale alone: z = logit_scale * x).

NaN IS WRITTEN AS THE JSON STRING "NaN" (a figure with no counted row, or a mean over a
row whose logits hold a NaN); every other figure is a plain JSON number (float64 repr,
round-trips exactly).

Definitions (per counted row, target != ignore_index, on z): pred = argmax z (lowest index
on ties; -1 for a NaN row), correct = pred == target, in_top_k = #{c: z_c > z_t} < k
(never for a NaN row), confidence = max softmax prob, entropy = lse - sum p z,
nll = lse - z_t. Means over counted rows, unweighted; perplexity = exp(nll); ece over
B equal-width bins, bin = min(floor(conf * B), B - 1), ece = sum (n_b / n) |acc_b - conf_b|.

sklearn's top_k_accuracy_score breaks ties by putting the higher class index first, which
is not the definition (ties count for the target); it is used only for cases where no
class ties the target's logit in any counted row (then the rank is unambiguous), and its
figure is cross-checked against the definition. Elsewhere the source is "definition".
"""
import json
import math
import os
import shutil
import warnings

import numpy as np
import sklearn
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, log_loss, top_k_accuracy_score

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")
README = """# Evaluation-metrics reference cases (tests/data/metrics_*)

Written by scripts/make_metrics_reference.py (see its docstring for the full format).
One folder per case: logits.npy (float32 [N, V]), targets.npy (int64 [N]) or probs.npy
(float32 [N, V]), metrics.json. In metrics.json NaN is written as the JSON string "NaN".
"""

# ECE bin boundaries and (for transformed logits) order decisions must not be within f32
# rounding of flipping; cases are generated from the first seed that passes.
ECE_MARGIN = 1e-4   # in units of conf * B
Z_GAP = 1e-5        # between distinct z values that decide pred / in_top_k (softcap case)


def jnum(v):
    v = float(v)
    return "NaN" if math.isnan(v) else v


def transform(x64, softcap, logit_scale):
    z = x64 * (1.0 if logit_scale is None else logit_scale)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    return z


def row_stats(z):
    """Per row (float64): pred, lse, confidence, entropy, nan mask."""
    n, v = z.shape
    nan = np.isnan(z).any(axis=1)
    pred = np.argmax(np.where(np.isnan(z), -np.inf, z), axis=1).astype(np.int64)
    pred[nan] = -1
    m = np.max(z, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        e = np.exp(z - m)
        s = e.sum(axis=1)
        lse = m[:, 0] + np.log(s)
        p = e / s[:, None]
        # p_c z_c with p_c = 0 at a -inf logit is 0 (a masked class).
        pz = np.where(p == 0, 0.0, p * z)
        entropy = lse - pz.sum(axis=1)
        conf = 1.0 / s
    lse[nan] = np.nan
    entropy[nan] = np.nan
    conf[nan] = np.nan
    return pred, lse, p, conf, entropy, nan


def in_top_k(z, t, nan, k):
    zt = z[np.arange(len(t)), t]
    above = (z > zt[:, None]).sum(axis=1)
    return (above < k) & ~nan


def ece_def(conf, correct, bins):
    if np.isnan(conf).any():
        return math.nan
    n = len(conf)
    b = np.minimum(np.floor(conf * bins).astype(np.int64), bins - 1)
    total = 0.0
    for i in range(bins):
        sel = b == i
        nb = int(sel.sum())
        if nb:
            total += nb / n * abs(correct[sel].mean() - conf[sel].mean())
    return total


def robust(x, targets_or_probs, is_probs, ignore_index, softcap, logit_scale, bins):
    """Whether the stored f32 data is safe from f32-vs-f64 flips (see ECE_MARGIN, Z_GAP)."""
    z = transform(x.astype(np.float64), softcap, logit_scale)
    t, counted = targets_of(targets_or_probs, is_probs, ignore_index)
    if is_probs:
        srt = np.sort(targets_or_probs, axis=1)
        if targets_or_probs.shape[1] > 1 and (srt[:, -1] == srt[:, -2]).any():
            return False  # argmax of the prob row not unique
    _, _, _, conf, _, nan = row_stats(z)
    ok = counted & ~nan
    cb = conf[ok] * bins
    cb = cb[cb < bins - 1]  # the top bin takes everything above B - 1
    if len(cb) and np.min(np.abs(cb - np.round(cb))) < ECE_MARGIN:
        return False
    if softcap is not None or logit_scale is not None:
        for r in np.nonzero(ok)[0]:
            row = z[r]
            fin = row[np.isfinite(row)]
            d = np.abs(fin - row[t[r]])
            d2 = np.abs(fin - fin.max())
            d = np.concatenate([d, d2])
            d = d[d > 0]  # exact equalities stay exact in f32 (equal x give equal z)
            if len(d) and d.min() < Z_GAP:
                return False
    return True


def targets_of(tp, is_probs, ignore_index):
    if is_probs:
        t = np.argmax(tp, axis=1).astype(np.int64)
        return t, np.ones(len(t), dtype=bool)
    t = tp.astype(np.int64)
    counted = t != ignore_index
    return np.where(counted, t, 0), counted


def compute(name, x, tp, is_probs, top_k, bins, ignore_index, softcap, logit_scale, description):
    n, v = x.shape
    x64 = x.astype(np.float64)
    z = transform(x64, softcap, logit_scale)
    t, counted = targets_of(tp, is_probs, ignore_index)
    pred, lse, p, conf, entropy, nan = row_stats(z)
    nc = int(counted.sum())
    rows = np.arange(n)
    tc, zc, nanc = t[counted], z[counted], nan[counted]
    sources, checks = {}, {}

    # accuracy
    correct = (pred[counted] == tc)
    if nc:
        accuracy = accuracy_score(tc, pred[counted])
        assert accuracy == correct.mean()
        sources["accuracy"] = "sklearn.metrics.accuracy_score (pred = numpy.argmax, lowest index on ties, -1 for NaN rows)"
    else:
        accuracy = math.nan
        sources["accuracy"] = "definition (no counted row: NaN)"

    # top-k
    topk, topk_src, topk_chk = {}, {}, {}
    zt = zc[np.arange(nc), tc] if nc else np.zeros(0)
    target_tied = bool(nc) and bool(((zc == zt[:, None]).sum(axis=1) > 1).any())
    sk_ok = nc > 0 and v > 2 and not nanc.any() and np.isfinite(zc).all()
    for k in top_k:
        d = float(in_top_k(zc, tc, nanc, k).mean()) if nc else math.nan
        sk = None
        if sk_ok:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # k >= V warns
                sk = top_k_accuracy_score(tc, zc, k=k, labels=np.arange(v))
        if sk is not None and not target_tied:
            assert abs(sk - d) < 1e-15, (name, k, sk, d)
            topk[str(k)] = sk
            topk_src[str(k)] = "sklearn.metrics.top_k_accuracy_score(labels=range(V))"
            topk_chk[str(k)] = {"definition": jnum(d)}
        else:
            topk[str(k)] = d
            topk_src[str(k)] = "definition (numpy: #{c: z_c > z_t} < k)"
            if sk is not None:
                topk_chk[str(k)] = {"sklearn.metrics.top_k_accuracy_score (ties: higher index first; NOT used)": jnum(sk)}
    sources["top_k_accuracy"] = topk_src
    if topk_chk:
        checks["top_k_accuracy"] = topk_chk

    # nll: torch F.cross_entropy (float64) primary, numpy lse - z_t and sklearn log_loss checks
    nll_np = float(np.mean(lse[counted] - z[rows[counted], tc])) if nc else math.nan
    zt_torch = torch.from_numpy(z)
    tt_torch = torch.from_numpy(np.where(counted, t, ignore_index).astype(np.int64))
    nll_t = float(F.cross_entropy(zt_torch, tt_torch, reduction="mean", ignore_index=ignore_index))
    if math.isnan(nll_np):
        assert math.isnan(nll_t), (name, nll_t)
    else:
        assert abs(nll_t - nll_np) <= 1e-12 * max(1.0, abs(nll_np)), (name, nll_t, nll_np)
    # Row by row too (catches a masked -inf class in a case whose means are NaN).
    rows_t = F.cross_entropy(zt_torch, tt_torch, reduction="none", ignore_index=ignore_index).numpy()
    rows_np = np.where(counted, lse - z[rows, t], 0.0)
    fin = counted & ~nan
    assert np.allclose(rows_t[fin], rows_np[fin], rtol=1e-12, atol=1e-13), name
    assert np.isnan(rows_t[counted & nan]).all(), name
    nll = nll_t
    sources["nll"] = "torch.nn.functional.cross_entropy(float64 z, targets, reduction='mean', ignore_index)"
    checks["nll"] = {"numpy lse - z_t (float64)": jnum(nll_np)}
    ptc = p[rows[counted], tc] if nc else np.zeros(0)
    if nc and v >= 2 and not nanc.any() and (ptc >= 1e-15).all():
        ll = log_loss(tc, p[counted], labels=np.arange(v))
        assert abs(ll - nll_np) < 1e-12 * max(1.0, abs(nll_np)), (name, ll, nll_np)
        checks["nll"]["sklearn.metrics.log_loss(softmax probs, labels=range(V))"] = jnum(ll)
    perplexity = math.exp(nll) if not math.isnan(nll) else math.nan
    sources["perplexity"] = "math.exp(nll)"

    # entropy: torch Categorical (float64) primary, numpy check
    ent_np = float(np.mean(entropy[counted])) if nc else math.nan
    if nc:
        cat = torch.distributions.Categorical(logits=torch.from_numpy(zc), validate_args=False)
        ent_rows = cat.entropy().numpy()
        ent_rows = np.where(nanc, np.nan, ent_rows)
        ent_t = float(np.mean(ent_rows))
        ok = ~nanc
        assert np.allclose(ent_rows[ok], entropy[counted][ok], rtol=1e-12, atol=1e-13), name
    else:
        ent_t = math.nan
    if math.isnan(ent_np):
        assert math.isnan(ent_t)
    else:
        assert abs(ent_t - ent_np) <= 1e-12 * max(1.0, abs(ent_np)), (name, ent_t, ent_np)
    ent_val = ent_t
    sources["entropy"] = "torch.distributions.Categorical(logits=float64 z).entropy(), mean over counted rows"
    checks["entropy"] = {"numpy lse - sum p z (float64)": jnum(ent_np)}

    # ece
    ece = ece_def(conf[counted], correct, bins) if nc else math.nan
    sources["ece"] = f"definition (numpy float64, {bins} equal-width bins)"
    sources["pred"] = "numpy.argmax of float64 z (lowest index on ties); -1 for a row holding a NaN"
    sources["counted_rows"] = "definition (target != ignore_index; probability targets: all rows)"

    return {
        "description": description,
        "top_k": list(top_k),
        "ece_bins": bins,
        "ignore_index": ignore_index,
        "softcap": softcap,
        "logit_scale": logit_scale,
        "accuracy": jnum(accuracy),
        "top_k_accuracy": {k: jnum(val) for k, val in topk.items()},
        "nll": jnum(nll),
        "perplexity": jnum(perplexity),
        "entropy": jnum(ent_val),
        "ece": jnum(ece),
        "counted_rows": nc,
        "pred": [int(q) for q in pred],
        "sources": sources,
        "cross_checks": checks,
    }


def write_case(name, gen, seed, top_k=(1, 5), bins=15, ignore_index=-100, softcap=None,
               logit_scale=None, is_probs=False, description=""):
    """gen(rng) -> (logits f32 [N, V], targets int64 [N] or probs f32 [N, V])."""
    for attempt in range(200):
        rng = np.random.default_rng(seed + 1000 * attempt)
        x, tp = gen(rng)
        if robust(x, tp, is_probs, ignore_index, softcap, logit_scale, bins):
            break
    else:
        raise RuntimeError(f"{name}: no robust seed")
    x = np.ascontiguousarray(x, dtype=np.float32)
    d = os.path.join(OUT, f"metrics_{name}")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    np.save(os.path.join(d, "logits.npy"), x)
    if is_probs:
        tp = np.ascontiguousarray(tp, dtype=np.float32)
        np.save(os.path.join(d, "probs.npy"), tp)
    else:
        tp = np.ascontiguousarray(tp, dtype=np.int64)
        np.save(os.path.join(d, "targets.npy"), tp)
    m = compute(name, x, tp, is_probs, top_k, bins, ignore_index, softcap, logit_scale,
                description)
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump(m, f, indent=1, allow_nan=False)
        f.write("\n")
    print(f"metrics_{name}: seed {seed + 1000 * attempt}, N={x.shape[0]} V={x.shape[1]}, "
          f"counted {m['counted_rows']}, acc {m['accuracy']}, top-k {m['top_k_accuracy']}, "
          f"nll {m['nll']}, entropy {m['entropy']}, ece {m['ece']}")
    return d


# ----------------------------------------------------------------------------- cases

def gen_basic(rng):
    x = (rng.standard_normal((64, 10)) * 2).astype(np.float32)
    return x, rng.integers(0, 10, 64)


def gen_ties(rng):
    n, v = 32, 8
    x = (np.round(rng.uniform(-2, 2, (n, v)) * 2) / 2).astype(np.float32)
    t = rng.integers(0, v, n)
    # Constructed rows (the rest random, with many ties of their own):
    # 0: max tied (indices 0 and 4), target = 4, the higher one: pred 0, incorrect, in top-1.
    x[0] = [2, -1, 0, 1.5, 2, -2, 0.5, -0.5]; t[0] = 4
    # 1: same row, target = 0 (the lowest tied max): correct.
    x[1] = x[0]; t[1] = 0
    # 2: target ties the 2nd value (1.5 at 0 and 3, one value 2 above): in top-2.
    x[2] = [1.5, 2, 0, 1.5, -0.5, 1, 0, -2]; t[2] = 0
    # 3: target ties the 5th value (0 at 4, 5, 6; four values above): in top-5.
    x[3] = [2, 1.5, 1, 0.5, 0, 0, 0, -1]; t[3] = 4
    # 4: every logit equal: pred 0, target 3: incorrect, in top-1.
    x[4] = 0.5; t[4] = 3
    # 5: three-way tied max (1, 2, 3), target 3: pred 1, in top-1.
    x[5] = [1, 2, 2, 2, -1, 0, -2, 0.5]; t[5] = 3
    # 6: target ties the 2nd value three ways after a unique max: in top-2 and top-5.
    x[6] = [-2, 1, 2, -1, 1, 0, 1, -0.5]; t[6] = 6
    return x, t


def gen_ignored(rng):
    n, v = 48, 12
    x = (rng.standard_normal((n, v)) * 2).astype(np.float32)
    t = rng.integers(0, v, n)
    ign = np.concatenate([[0, n - 1], 1 + rng.permutation(n - 2)[:14]])  # first, last + 14
    t[ign] = -100
    return x, t


def gen_ignore_class(rng):
    n, v = 48, 12
    x = (rng.standard_normal((n, v)) * 2).astype(np.float32)
    t = rng.integers(0, v, n)
    t[rng.permutation(n)[:10]] = 3  # at least 10 rows with the ignored class
    return x, t


def gen_all_ignored(rng):
    x = (rng.standard_normal((5, 4)) * 2).astype(np.float32)
    return x, np.full(5, -100, dtype=np.int64)


def gen_one_class(rng):
    x = (rng.standard_normal((16, 1)) * 3).astype(np.float32)
    return x, np.zeros(16, dtype=np.int64)


def gen_probs(rng):
    n, v = 40, 9
    x = (rng.standard_normal((n, v)) * 2).astype(np.float32)
    a = rng.standard_normal((n, v)) * 3
    e = np.exp(a - a.max(axis=1, keepdims=True))
    probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return x, probs


def gen_softcap(rng):
    x = (rng.standard_normal((32, 50)) * 20).astype(np.float32)
    return x, rng.integers(0, 50, 32)


def gen_vocab(rng):
    n, v = 64, 2000
    x = (rng.standard_normal((n, v)) * 2).astype(np.float32)
    t = rng.integers(0, v, n)
    # Lift the target logit by a random amount so accuracy, top-5 and the calibration
    # bins are not all trivial.
    x[np.arange(n), t] += rng.uniform(0, 12, n).astype(np.float32)
    return x, t


def gen_nan_rows(rng):
    n, v = 12, 6
    x = (rng.standard_normal((n, v)) * 2).astype(np.float32)
    t = rng.integers(0, v, n)
    x[3, (t[3] + 2) % v] = np.nan   # NaN away from the target
    x[8, t[8]] = np.nan             # NaN at the target
    x[5, (t[5] + 1) % v] = -np.inf  # a masked class (target finite)
    return x, t


def main():
    os.makedirs(OUT, exist_ok=True)
    for d in os.listdir(OUT):
        if d.startswith("metrics_"):
            shutil.rmtree(os.path.join(OUT, d))
    print(f"numpy {np.__version__}, scikit-learn {sklearn.__version__}, torch {torch.__version__}")
    d = write_case("basic", gen_basic, 101, top_k=(1, 3, 5),
                   description="N=64 V=10, normal logits x2, uniform targets")
    with open(os.path.join(d, "README.md"), "w") as f:
        f.write(README)
    write_case("ties", gen_ties, 102, top_k=(1, 2, 5),
               description="N=32 V=8, logits multiples of 0.5 in [-2, 2]: tied maxima, targets "
                           "tying the max and the k-th value (rows 0-6 constructed); top-k by the "
                           "definition, ties count for the target")
    write_case("ignored", gen_ignored, 103,
               description="N=48 V=12, 16 targets -100 (rows 0 and 47 among them)")
    write_case("ignore_class", gen_ignore_class, 104, ignore_index=3,
               description="N=48 V=12, ignore_index 3 (a valid class): rows with target 3 ignored")
    write_case("all_ignored", gen_all_ignored, 105,
               description="N=5 V=4, every target -100: every figure NaN, counted_rows 0")
    write_case("one_class", gen_one_class, 106,
               description="N=16 V=1: confidence 1, entropy 0, nll 0, accuracy 1")
    write_case("probs", gen_probs, 107, is_probs=True,
               description="N=40 V=9 probability targets (probs.npy, softmax of normal x3); "
                           "target = argmax of the prob row (unique); ignore_index does not apply")
    write_case("softcap", gen_softcap, 108, softcap=15.0, logit_scale=1.5,
               description="N=32 V=50, normal logits x20, z = 15 tanh(1.5 x / 15)")
    write_case("vocab", gen_vocab, 109,
               description="N=64 V=2000, normal logits x2, target logit lifted by U(0, 12)")
    write_case("nan_rows", gen_nan_rows, 110,
               description="N=12 V=6; rows 3 and 8 hold a NaN (row 8 at the target): pred -1, "
                           "never correct or in top-k, nll/entropy/perplexity/ece NaN; row 5 "
                           "holds a -inf (masked class, finite target)")


if __name__ == "__main__":
    main()
