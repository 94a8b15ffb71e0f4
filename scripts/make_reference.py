#!/usr/bin/env python3
"""Regenerate tests/data: small cross-entropy cases computed by PyTorch in float64.

Usage: python3 scripts/make_reference.py   (needs numpy and torch; not crate deps)

Also the fused linear head (folders linear_*: hidden, weight, bias and the gradients of
all three; see `linear_case`).

Each case is a folder with logits.npy (float32 [N, V]), targets.npy (int64 [N]),
weights.npy (float32 [V], optional), options.txt (key = value lines), and for each
reduction r in mean/sum/none: loss_r.npy (float64: 0-d, or [N] for none) and grad_r.npy
(float64 [N, V]: d(loss)/d(logits) with upstream gradient 1, or 1 per row for none).
The float32 logits are widened to float64 before PyTorch sees them, so the data is the
exact answer for the stored inputs. Options PyTorch has (weight, ignore_index,
label_smoothing) go through F.cross_entropy; the extensions (z-loss, softcap, logit
scale, n_items) follow shared/docs/semantics.md on top of it.
"""
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data")



def write_options(d, opts, softcap, n_items):
    """options.txt of a case: `key = value` lines, softcap and n_items only when set."""
    if softcap is not None:
        opts["softcap"] = softcap
    if n_items is not None:
        opts["n_items"] = n_items
    with open(os.path.join(d, "options.txt"), "w") as f:
        for k, val in opts.items():
            f.write(f"{k} = {val!r}\n")

def mean_of(ce, zl, keep, tt, wt, ignore_index, n_items):
    """`mean` as shared/docs/semantics.md defines it: the cross-entropy part over
    PyTorch's Σ w_y, the z-loss part over the counted rows (Liger's convention); both
    over n_items when it is given."""
    if n_items is not None:
        return (ce.sum() + zl.sum()) / float(n_items)
    safe_t = torch.where(tt == ignore_index, torch.zeros_like(tt), tt)
    den = (keep * (wt[safe_t] if wt is not None else 1.0)).sum()
    return ce.sum() / den + zl.sum() / keep.sum()


def class_index_loss(x, tt, wt, reduction, ignore_index, label_smoothing, z_loss, softcap,
                     logit_scale, n_items):
    """(z, loss): the logits x as the loss sees them (logit scale, softcap) and the
    class-index loss under `reduction`, PyTorch's F.cross_entropy with the extensions of
    shared/docs/semantics.md on top."""
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ce = F.cross_entropy(z, tt, weight=wt, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    keep = (tt != ignore_index).to(torch.float64)
    zl = z_loss * torch.logsumexp(z, dim=1).square() * keep if z_loss else torch.zeros_like(ce)
    if reduction == "none":
        return z, ce + zl
    if reduction == "sum":
        return z, (ce + zl).sum()
    return z, mean_of(ce, zl, keep, tt, wt, ignore_index, n_items)


def case(name, n, v, seed, weights=False, ignore_index=-100, ignored=0, label_smoothing=0.0,
         z_loss=0.0, softcap=None, logit_scale=1.0, n_items=None, offset=0.0, masked=False):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, v)) * 2 + offset).astype(np.float32)
    t = rng.integers(0, v, size=n).astype(np.int64)
    if masked:
        mask = rng.random((n, v)) < 0.4
        mask[np.arange(n), t] = False
        x[mask] = -np.inf
    for i in range(ignored):
        t[(i * 5) % n] = ignore_index
    w = (rng.random(v) * 2).astype(np.float32) if weights else None
    d = os.path.join(OUT, name)
    os.makedirs(d)
    np.save(os.path.join(d, "logits.npy"), x)
    np.save(os.path.join(d, "targets.npy"), t)
    if w is not None:
        np.save(os.path.join(d, "weights.npy"), w)
    opts = {"ignore_index": ignore_index, "label_smoothing": label_smoothing, "z_loss": z_loss,
            "logit_scale": logit_scale}
    write_options(d, opts, softcap, n_items)

    wt = torch.from_numpy(w.astype(np.float64)) if w is not None else None
    tt = torch.from_numpy(t)
    for reduction in ["mean", "sum", "none"]:
        xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
        z, loss = class_index_loss(xt, tt, wt, reduction, ignore_index, label_smoothing, z_loss,
                                   softcap, logit_scale, n_items)
        if reduction == "mean":
            if n_items is None and not z_loss and not softcap and logit_scale == 1.0:
                direct = F.cross_entropy(z, tt, weight=wt, ignore_index=ignore_index,
                                         label_smoothing=label_smoothing)
                assert torch.allclose(loss, direct, rtol=1e-12, atol=1e-12, equal_nan=True), (name, loss, direct)
        loss.backward(torch.ones_like(loss))
        np.save(os.path.join(d, f"loss_{reduction}.npy"), loss.detach().numpy())
        np.save(os.path.join(d, f"grad_{reduction}.npy"), xt.grad.numpy())


def bce_case(name, n, v, seed, weights=False, pos_weight=False, soft=False, n_items=None):
    """Binary cross-entropy with logits: folder bce_<name>, targets float32 [N, V]."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, v)) * 3).astype(np.float32)
    y = (rng.random((n, v)) if soft else (rng.random((n, v)) < 0.3)).astype(np.float32)
    w = (rng.random(v) * 2).astype(np.float32) if weights else None
    pw = (rng.random(v) * 3).astype(np.float32) if pos_weight else None
    d = os.path.join(OUT, "bce_" + name)
    os.makedirs(d)
    np.save(os.path.join(d, "logits.npy"), x)
    np.save(os.path.join(d, "targets.npy"), y)
    if w is not None:
        np.save(os.path.join(d, "weights.npy"), w)
    if pw is not None:
        np.save(os.path.join(d, "pos_weight.npy"), pw)
    with open(os.path.join(d, "options.txt"), "w") as f:
        if n_items is not None:
            f.write(f"n_items = {n_items!r}\n")
    wt = torch.from_numpy(w.astype(np.float64)) if w is not None else None
    pwt = torch.from_numpy(pw.astype(np.float64)) if pw is not None else None
    for reduction in ["mean", "sum", "none"]:
        xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
        yt = torch.from_numpy(y.astype(np.float64))
        rows = F.binary_cross_entropy_with_logits(xt, yt, weight=wt, pos_weight=pwt, reduction="none")
        if reduction == "none":
            loss = rows
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows.sum() / (n_items if n_items is not None else rows.numel())
            if n_items is None:
                direct = F.binary_cross_entropy_with_logits(xt, yt, weight=wt, pos_weight=pwt)
                assert torch.allclose(loss, direct, rtol=1e-12, atol=1e-12)
        loss.backward(torch.ones_like(loss))
        np.save(os.path.join(d, f"loss_{reduction}.npy"), loss.detach().numpy())
        np.save(os.path.join(d, f"grad_{reduction}.npy"), xt.grad.numpy())


def soft_case(name, n, v, seed, weights=False, label_smoothing=0.0, z_loss=0.0, softcap=None,
              logit_scale=1.0, n_items=None, masked=False):
    """Probability targets: folder soft_<name>, targets float32 [N, V] (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, v)) * 2).astype(np.float32)
    p = rng.random((n, v)) ** 3
    if masked:
        zero = rng.random((n, v)) < 0.5
        p[zero] = 0.0
        x[zero & (rng.random((n, v)) < 0.5)] = -np.inf
        p[:, 0] += 1e-3
        x[:, 0] = np.abs(x[:, 0])
    p = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    w = (rng.random(v) * 2).astype(np.float32) if weights else None
    d = os.path.join(OUT, "soft_" + name)
    os.makedirs(d)
    np.save(os.path.join(d, "logits.npy"), x)
    np.save(os.path.join(d, "targets.npy"), p)
    if w is not None:
        np.save(os.path.join(d, "weights.npy"), w)
    opts = {"label_smoothing": label_smoothing, "z_loss": z_loss, "logit_scale": logit_scale}
    write_options(d, opts, softcap, n_items)
    wt = torch.from_numpy(w.astype(np.float64)) if w is not None else None
    pt = torch.from_numpy(p.astype(np.float64))
    for reduction in ["mean", "sum", "none"]:
        xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
        z = xt * logit_scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        rows = F.cross_entropy(z, pt, weight=wt, reduction="none", label_smoothing=label_smoothing)
        if z_loss:
            rows = rows + z_loss * torch.logsumexp(z, dim=1).square()
        if reduction == "none":
            loss = rows
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows.sum() / (n_items if n_items is not None else n)
            if n_items is None and not z_loss and softcap is None and logit_scale == 1.0:
                direct = F.cross_entropy(z, pt, weight=wt, label_smoothing=label_smoothing)
                assert torch.allclose(loss, direct, rtol=1e-12, atol=1e-12), (name, loss, direct)
        loss.backward(torch.ones_like(loss))
        np.save(os.path.join(d, f"loss_{reduction}.npy"), loss.detach().numpy())
        np.save(os.path.join(d, f"grad_{reduction}.npy"), xt.grad.numpy())


def half_case(name, n, v, seed, dtype, **kw):
    """float16 logits: folder half_<name>, logits.npy in float16; PyTorch computes in
    float64 on the widened values (the exact answer for the stored inputs)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, v)) * 3).astype(dtype)
    t = rng.integers(0, v, size=n).astype(np.int64)
    t[1] = -100
    d = os.path.join(OUT, "half_" + name)
    os.makedirs(d)
    np.save(os.path.join(d, "logits.npy"), x)
    np.save(os.path.join(d, "targets.npy"), t)
    ls = kw.get("label_smoothing", 0.0)
    with open(os.path.join(d, "options.txt"), "w") as f:
        f.write(f"label_smoothing = {ls!r}\n")
    tt = torch.from_numpy(t)
    for reduction in ["mean", "sum", "none"]:
        xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
        loss = F.cross_entropy(xt, tt, reduction=reduction, label_smoothing=ls)
        loss.backward(torch.ones_like(loss))
        np.save(os.path.join(d, f"loss_{reduction}.npy"), loss.detach().numpy())
        np.save(os.path.join(d, f"grad_{reduction}.npy"), xt.grad.numpy())

def linear_case(name, n, d, v, seed, bias=True, dtype=np.float32, weights=False, ignore_index=-100,
                ignored=0, label_smoothing=0.0, z_loss=0.0, softcap=None, logit_scale=1.0,
                n_items=None, grad_reductions=("mean", "sum", "none")):
    """The fused linear head: folder linear_<name> with hidden.npy [N, D], weight.npy
    [V, D] (nn.Linear's layout) and bias.npy [V] (optional) in `dtype` (float32 or
    float16), targets.npy, options as for `case`, and per reduction loss_r.npy and, for
    the reductions in `grad_reductions`, grad_hidden_r.npy, grad_weight_r.npy and
    grad_bias_r.npy (float64: the gradients of the loss with upstream gradient 1, or 1
    per row for none). The inputs are widened to float64 before PyTorch sees them
    (F.linear, then the same loss as `case`)."""
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, d)).astype(dtype)
    w = (rng.standard_normal((v, d)) * (2.0 / np.sqrt(d))).astype(dtype)
    b = (rng.standard_normal(v) * 0.5).astype(dtype) if bias else None
    t = rng.integers(0, v, size=n).astype(np.int64)
    for i in range(ignored):
        t[(i * 5) % n] = ignore_index
    cw = (rng.random(v) * 2).astype(np.float32) if weights else None
    dd = os.path.join(OUT, "linear_" + name)
    os.makedirs(dd)
    np.save(os.path.join(dd, "hidden.npy"), h)
    np.save(os.path.join(dd, "weight.npy"), w)
    if b is not None:
        np.save(os.path.join(dd, "bias.npy"), b)
    np.save(os.path.join(dd, "targets.npy"), t)
    if cw is not None:
        np.save(os.path.join(dd, "weights.npy"), cw)
    opts = {"ignore_index": ignore_index, "label_smoothing": label_smoothing, "z_loss": z_loss,
            "logit_scale": logit_scale}
    write_options(dd, opts, softcap, n_items)
    wt = torch.from_numpy(cw.astype(np.float64)) if cw is not None else None
    tt = torch.from_numpy(t)
    for reduction in ["mean", "sum", "none"]:
        ht = torch.from_numpy(h.astype(np.float64)).requires_grad_(True)
        wm = torch.from_numpy(w.astype(np.float64)).requires_grad_(True)
        bt = torch.from_numpy(b.astype(np.float64)).requires_grad_(True) if b is not None else None
        _, loss = class_index_loss(F.linear(ht, wm, bt), tt, wt, reduction, ignore_index,
                                   label_smoothing, z_loss, softcap, logit_scale, n_items)
        np.save(os.path.join(dd, f"loss_{reduction}.npy"), loss.detach().numpy())
        if reduction in grad_reductions:
            loss.backward(torch.ones_like(loss))
            np.save(os.path.join(dd, f"grad_hidden_{reduction}.npy"), ht.grad.numpy())
            np.save(os.path.join(dd, f"grad_weight_{reduction}.npy"), wm.grad.numpy())
            if bt is not None:
                np.save(os.path.join(dd, f"grad_bias_{reduction}.npy"), bt.grad.numpy())


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    case("plain", 13, 37, 1)
    case("ignore_default", 16, 29, 2, ignored=4)
    case("ignore_valid_class", 16, 29, 3, ignore_index=3, ignored=3)
    case("weights", 15, 33, 4, weights=True)
    case("weights_ignore", 15, 33, 5, weights=True, ignored=3)
    case("smoothing", 12, 40, 6, label_smoothing=0.1)
    case("smoothing_weights_ignore", 14, 31, 7, weights=True, ignored=3, label_smoothing=0.2)
    case("smoothing_full", 9, 17, 8, label_smoothing=1.0)
    case("z_loss", 11, 50, 9, z_loss=1e-2, ignored=2)
    case("softcap", 10, 45, 10, softcap=3.0)
    case("logit_scale", 10, 45, 11, logit_scale=0.5)
    case("n_items", 12, 30, 12, n_items=100.0, ignored=2)
    case("everything", 17, 64, 13, weights=True, ignored=4, label_smoothing=0.05, z_loss=1e-3,
         softcap=20.0, logit_scale=1.5, n_items=40.0)
    case("offset_masked", 12, 64, 14, offset=1e4, masked=True)
    case("smoothing_offset", 12, 64, 15, offset=1e3, label_smoothing=0.1, weights=True)
    soft_case("plain", 12, 29, 31)
    soft_case("weights_smoothing", 12, 29, 32, weights=True, label_smoothing=0.15)
    soft_case("everything", 10, 40, 33, weights=True, label_smoothing=0.05, z_loss=1e-3, softcap=10.0,
              logit_scale=0.9, n_items=7.0)
    soft_case("masked", 9, 21, 34)
    half_case("f16", 11, 40, 41, np.float16)
    half_case("f16_smoothing", 9, 64, 42, np.float16, label_smoothing=0.1)
    bce_case("plain", 9, 13, 21)
    bce_case("weights", 9, 13, 22, weights=True)
    bce_case("pos_weight", 11, 7, 23, pos_weight=True)
    bce_case("soft_weights_pos_weight", 10, 17, 24, weights=True, pos_weight=True, soft=True)
    bce_case("n_items", 8, 6, 25, n_items=100.0)
    # The linear head: N from 1 to 700, D from 1 to 512, V from 2 to 32000.
    linear_case("plain", 13, 8, 37, 51)
    linear_case("no_bias_tiny", 1, 1, 2, 52, bias=False)
    linear_case("weights_smoothing_ignore", 16, 12, 29, 53, weights=True, ignored=4, label_smoothing=0.1)
    linear_case("z_loss_softcap", 11, 16, 50, 54, z_loss=1e-2, softcap=3.0, ignored=2)
    linear_case("logit_scale_n_items", 12, 5, 30, 55, logit_scale=0.5, n_items=100.0, ignored=2)
    # Under mean, 0/0: PyTorch's gradients are NaN there, ours exactly 0 (the contract).
    linear_case("all_ignored", 6, 4, 9, 56, ignored=6, grad_reductions=("sum", "none"))
    linear_case("everything", 17, 24, 64, 57, weights=True, ignored=4, label_smoothing=0.05,
                z_loss=1e-3, softcap=8.0, logit_scale=1.3)
    linear_case("many_rows", 700, 4, 50, 58, ignored=30, label_smoothing=0.1)
    linear_case("wide", 5, 512, 20, 59, weights=True)
    linear_case("vocab_32000", 3, 1, 32000, 60, grad_reductions=("mean",))
    linear_case("f16", 9, 16, 40, 61, dtype=np.float16, ignored=1)
    linear_case("f16_smoothing_no_bias", 7, 8, 64, 62, dtype=np.float16, bias=False, label_smoothing=0.1)
    print("wrote", sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
