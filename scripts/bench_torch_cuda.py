#!/usr/bin/env python3
"""PyTorch's eager F.cross_entropy on a CUDA GPU, as ratios to copy and read kernels
timed in the same run: the anchor xent's GPU figures are compared with (`xent bench`
reports its kernels the same way, as ratios to its own in-run copy and read kernels).

Usage: python3 scripts/bench_torch_cuda.py [--shapes 8192x131072,...] [--iters 10]
       [--device cuda]

Prints one JSON object per line: {"rows", "classes", "pass", "median_ms", "min_ms",
"copy_ms", "read_ms", "ratio_to_copy" (forward-backward), "ratio_to_read" (forward)}.
forward = the loss without autograd; forward-backward = loss + backward of the mean
w.r.t. the logits (grad zeroed by assignment, not timed apart). copy = dst.copy_(src)
of the logits' bytes (1 read + 1 write); read = src.sum() (1 read). Device time from
CUDA events (wall time around synchronize on other devices). Needs torch; not a
dependency of the crate.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def timed(fn, iters, device):
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - s) * 1e3)
    times.sort()
    return times[len(times) // 2], times[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="8192x131072,1024x32000,256x32000")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = args.device
    for shape in args.shapes.split(","):
        n, v = (int(s) for s in shape.split("x"))
        torch.manual_seed(0)
        x = torch.randn(n, v, device=dev) * 2
        t = torch.randint(0, v, (n,), device=dev)
        dst = torch.empty_like(x)
        copy_ms, _ = timed(lambda: dst.copy_(x), args.iters, dev)
        read_ms, _ = timed(lambda: x.sum(), args.iters, dev)
        del dst
        xg = x.requires_grad_(True)

        def forward():
            with torch.no_grad():
                F.cross_entropy(x, t)

        def forward_backward():
            xg.grad = None
            F.cross_entropy(xg, t).backward()

        for name, fn in [("forward", forward), ("forward-backward", forward_backward)]:
            med, lo = timed(fn, args.iters, dev)
            row = {"device": dev, "impl": f"torch {torch.__version__} eager", "rows": n, "classes": v,
                   "pass": name, "median_ms": med, "min_ms": lo, "copy_ms": copy_ms, "read_ms": read_ms}
            if name == "forward":
                row["ratio_to_read"] = med / read_ms
            else:
                row["ratio_to_copy"] = med / copy_ms
            print(json.dumps(row), flush=True)
        del x, xg, t
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
