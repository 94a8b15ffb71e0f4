#!/usr/bin/env python3
"""Compare `xent eval` with PyTorch's F.cross_entropy on files made here.

Usage: python3 scripts/compare_torch.py [--xent target/release/xent] [--devices gpu,reference]

Needs numpy and torch (CPU is enough); neither is a dependency of the crate. For each
case it writes logits/targets .npy files, runs `xent eval` with --out-loss/--out-grad,
and compares with PyTorch computed in float64 on the same float32 inputs, under the f32
tolerances of the test suite: loss |d| <= 1e-5*|ref| + 1e-6, gradient |d| <= 1e-6.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F


def cases():
    rng = np.random.default_rng(1234)

    def normal(n, v, scale=2.0):
        return (rng.standard_normal((n, v)) * scale).astype(np.float32)

    def tgt(n, v):
        return rng.integers(0, v, size=n).astype(np.int64)

    n, v = 300, 1000
    yield "hard targets", normal(n, v), tgt(n, v), -100
    t = tgt(n, v)
    t[::4] = -100
    yield "ignore_index -100", normal(n, v), t, -100
    t = tgt(n, v)
    yield "ignore_index = class 5", normal(n, v), t, 5
    x = normal(n, v)
    t = tgt(n, v)
    mask = rng.random((n, v)) < 0.7
    mask[np.arange(n), t] = False
    x[mask] = -np.inf
    yield "masked (-inf) vocabulary", x, t, -100
    yield "offset +1e4", normal(n, v) + np.float32(1e4), tgt(n, v), -100
    yield "spread x1000", normal(n, v, 1000.0), tgt(n, v), -100
    yield "70000x8", normal(70000, 8), tgt(70000, 8), -100
    yield "2x131072", normal(2, 131072), tgt(2, 131072), -100
    t = np.full(16, -100, dtype=np.int64)
    yield "all ignored", normal(16, 10), t, -100


def close(got, want, rtol, atol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    both_nan = np.isnan(got) & np.isnan(want)
    same_inf = np.isinf(want) & (got == want)
    ok = both_nan | same_inf | (np.abs(got - want) <= rtol * np.abs(want) + atol)
    err = np.where(both_nan | same_inf, 0.0, np.abs(got - want))
    return bool(ok.all()), float(np.nanmax(err)) if err.size else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xent", default="target/release/xent")
    ap.add_argument("--devices", default="gpu,reference")
    args = ap.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as d:
        for name, x, t, ignore in cases():
            lp, tp = os.path.join(d, "l.npy"), os.path.join(d, "t.npy")
            np.save(lp, x)
            np.save(tp, t)
            xt = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
            for reduction in ["mean", "sum", "none"]:
                xt.grad = None
                ref = F.cross_entropy(xt, torch.from_numpy(t), ignore_index=ignore, reduction=reduction)
                ref.backward(torch.ones_like(ref))
                want_loss, want_grad = ref.detach().numpy(), xt.grad.numpy()
                for device in args.devices.split(","):
                    lo, go = os.path.join(d, "loss.npy"), os.path.join(d, "grad.npy")
                    cmd = [args.xent, "eval", "--logits", lp, "--targets", tp, "--reduction", reduction,
                           "--ignore-index", str(ignore), "--device", device, "--out-loss", lo, "--out-grad", go]
                    p = subprocess.run(cmd, capture_output=True, text=True)
                    if p.returncode != 0:
                        print(f"FAIL {name} {reduction} {device}: exit {p.returncode}: {p.stderr.strip()}")
                        failures += 1
                        continue
                    info = json.loads(p.stdout)
                    loss_ok, loss_err = close(np.load(lo), want_loss, 1e-5, 1e-6)
                    grad_ok, grad_err = close(np.load(go), want_grad, 0.0, 1e-6)
                    printed = info["loss"]
                    if reduction != "none":
                        loss_ok &= close(np.float32(printed), want_loss, 1e-5, 1e-6)[0]
                    ok = loss_ok and grad_ok
                    failures += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {name:<26} {x.shape[0]:>6}x{x.shape[1]:<7} {reduction:<5} "
                          f"{device:<10} loss err {loss_err:.2e}  grad err {grad_err:.2e}  "
                          f"({info['adapter']}, {info['elapsed_ms']:.1f} ms)")
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
