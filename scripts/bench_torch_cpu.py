#!/usr/bin/env python3
"""PyTorch CPU's F.cross_entropy against xent's fast CPU path, same machine, same shapes.

Usage: python3 scripts/bench_torch_cpu.py [--xent target/release/xent] [--iters 15]

Needs torch (not a dependency of the crate). PyTorch runs with its default thread count;
xent's CPU path with rayon's (one thread per core). Forward = loss only (no autograd);
forward-backward = loss + backward of the mean loss w.r.t. the logits. Prints a table
and the ratio xent/PyTorch in throughput (higher is better for xent).
"""
import argparse
import json
import subprocess
import time

import torch
import torch.nn.functional as F

SHAPES = [(1024, 32000), (256, 32000), (64, 131072), (4096, 4096)]


def torch_ms(n, v, pass_, iters):
    torch.manual_seed(0)
    x = (torch.randn(n, v) * 2).requires_grad_(pass_ == "forward-backward")
    t = torch.randint(0, v, (n,))

    def run():
        if pass_ == "forward":
            with torch.no_grad():
                F.cross_entropy(x, t)
        else:
            x.grad = None
            F.cross_entropy(x, t).backward()

    for _ in range(3):
        run()
    times = []
    for _ in range(iters):
        s = time.perf_counter()
        run()
        times.append((time.perf_counter() - s) * 1e3)
    times.sort()
    return times[len(times) // 2], times[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xent", default="target/release/xent")
    ap.add_argument("--iters", type=int, default=15)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':>12} {'pass':<17} {'torch ms':>9} {'xent ms':>9} {'xent/torch throughput':>22}")
    for n, v in SHAPES:
        out = subprocess.run([args.xent, "bench", "--device", "cpu", "--rows", str(n), "--classes", str(v),
                              "--iters", str(args.iters), "--json"], capture_output=True, text=True, check=True)
        ours = {r["pass"]: r for r in json.loads(out.stdout)}
        for pass_ in ["forward", "forward-backward"]:
            t_med, _ = torch_ms(n, v, pass_, args.iters)
            x_med = ours[pass_]["median_ms"]
            print(f"{n:>5}x{v:<6} {pass_:<17} {t_med:>9.2f} {x_med:>9.2f} {t_med / x_med:>21.2f}x")


if __name__ == "__main__":
    main()
