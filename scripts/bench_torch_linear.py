#!/usr/bin/env python3
"""PyTorch CPU's linear head (F.linear + F.cross_entropy, + backward) against xent's fast
CPU path (`xent bench --linear --device cpu`), same machine, same shape: time and peak
memory.

Usage: python3 scripts/bench_torch_linear.py [--xent target/release/xent] [--rows 1024]
           [--hidden-dim 1024] [--classes 32000] [--iters 5]

Needs torch (not a dependency of the crate); PyTorch runs with its default threads,
xent with rayon's (one per core). Forward = the loss only (no autograd); forward-backward
= the mean loss and its gradients for h, W and b. Each PyTorch pass runs in a fresh
process, so its peak resident memory (ru_maxrss) minus the resident memory once the
inputs exist is what the pass needed; the gradients it returns (dh, dW, db) are listed
apart, because xent's `peak_bytes` counts neither inputs nor outputs (they are allocated
before its timed calls).
"""
import argparse
import json
import subprocess
import sys

CHILD = r"""
import resource, sys, time, json
import torch
import torch.nn.functional as F
n, d, v, iters, pass_ = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
grad = pass_ == "forward-backward"
h = torch.randn(n, d).requires_grad_(grad)
w = (torch.randn(v, d) * (2.0 / d ** 0.5)).requires_grad_(grad)
b = (torch.randn(v) * 0.5).requires_grad_(grad)
t = torch.randint(0, v, (n,))
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
base = rss()
def run():
    if grad:
        for p in (h, w, b):
            p.grad = None
        F.cross_entropy(F.linear(h, w, b), t).backward()
    else:
        with torch.no_grad():
            F.cross_entropy(F.linear(h, w, b), t)
run()
times = []
for _ in range(iters):
    s = time.perf_counter()
    run()
    times.append((time.perf_counter() - s) * 1e3)
times.sort()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
outputs = 4 * (n * d + v * d + v) if grad else 0
print(json.dumps({"median_ms": times[len(times) // 2], "min_ms": times[0], "peak_beyond_inputs": peak - base,
                  "gradient_outputs": outputs, "threads": torch.get_num_threads(), "torch": torch.__version__}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--xent", default="target/release/xent")
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--hidden-dim", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    n, d, v = a.rows, a.hidden_dim, a.classes
    out = subprocess.run([a.xent, "bench", "--linear", "--device", "cpu", "--rows", str(n), "--hidden-dim", str(d),
                          "--classes", str(v), "--iters", str(a.iters), "--json"],
                         capture_output=True, text=True, check=True)
    ours = {r["pass"]: r for r in json.loads(out.stdout)}
    mib = 1 << 20
    print(f"{n}x{d}x{v}, f32")
    print(f"{'pass':<17} {'torch ms':>9} {'xent ms':>9} {'speed':>7} {'torch MiB':>10} {'(+ grads)':>10} {'xent MiB':>9}")
    for pass_ in ["forward", "forward-backward"]:
        child = subprocess.run([sys.executable, "-c", CHILD, str(n), str(d), str(v), str(a.iters), pass_],
                               capture_output=True, text=True, check=True)
        torch_r = json.loads(child.stdout)
        x = ours[pass_]
        print(f"{pass_:<17} {torch_r['median_ms']:>9.1f} {x['median_ms']:>9.1f} "
              f"{torch_r['median_ms'] / x['median_ms']:>6.2f}x "
              f"{(torch_r['peak_beyond_inputs'] - torch_r['gradient_outputs']) / mib:>10.1f} "
              f"{torch_r['gradient_outputs'] / mib:>10.1f} {x['peak_bytes'] / mib:>9.1f}")
    print(f"torch {torch_r['torch']}, {torch_r['threads']} threads; speed = torch time / xent time; "
          "MiB: peak beyond the inputs, PyTorch's without the gradients it returns (listed apart)")


if __name__ == "__main__":
    main()
