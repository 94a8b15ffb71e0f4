#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the `device` tool): Vulkan loader, a carried
# binary (the machine has no Rust), `xent info`, `xent check`, `xent bench --json` with
# the default shapes plus 8192 x 131072 and 2 x 262144, a tuning sweep of the fused
# kernel on long rows, the linear head at 8192 x 4096 x 128256 and a sweep of its GEMM
# tile, and PyTorch's eager F.cross_entropy as an anchor (its own in-run
# copy and read) — everything under $OUT, at most 8 files, a summary table printed last.
#
# Prepare here, once (x86-64 machine, in the repo root):
#   echo /.gl/ >>.git/info/exclude; echo /.gpubin/ >>.git/info/exclude
#   mkdir -p .gl /tmp/amd64/partial; o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
#   apt-get $o update; (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
#   cargo build --release && mkdir -p .gpubin && cp target/release/xent .gpubin/
# Then run with carry [".gl", ".gpubin"], command `bash scripts/gpu-bench.sh`, timeout_s
# 600 (about 5 minutes of work on an H200; the sweep's shape is sized to stay well past
# the 60 MB L2 while costing a quarter of 8192 x 131072).
# XENT_GPU_BENCH_SMALL=1 shrinks every shape, to try the script on any adapter.
set -uo pipefail
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
log="$OUT/log.txt"
exec > >(tee -a "$log") 2>&1

if [ -d .gl ] && ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi

if [ -x "${XENT_BIN:-.gpubin/xent}" ]; then
  XENT="${XENT_BIN:-.gpubin/xent}"
elif command -v cargo >/dev/null 2>&1; then
  cargo build --release && XENT=target/release/xent
fi
[ -x "${XENT:-}" ] || { echo "no xent binary (carry .gpubin/xent or build here)"; exit 1; }

if [ "${XENT_GPU_BENCH_SMALL:-0}" = 1 ]; then
  BIG=(--rows 64 --classes 131072); SPLIT=(--rows 2 --classes 65536); SWEEP=(--rows 128 --classes 32768)
  TORCH_SHAPES=64x4096; ITERS=3
  HEAD=(--rows 64 --hidden-dim 64 --classes 4096); HEAD_SWEEP=(--rows 64 --hidden-dim 64 --classes 2048)
else
  BIG=(--rows 8192 --classes 131072); SPLIT=(--rows 2 --classes 262144); SWEEP=(--rows 2048 --classes 131072)
  TORCH_SHAPES=8192x131072,1024x32000,256x32000; ITERS=10
  HEAD=(--rows 8192 --hidden-dim 4096 --classes 128256); HEAD_SWEEP=(--rows 4096 --hidden-dim 4096 --classes 32000)
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true; "$XENT" info 2>&1; } > "$OUT/info.txt"
cat "$OUT/info.txt"
ADAPTER=$(grep -m1 -io 'nvidia[^(]*' "$OUT/info.txt" | grep -v -i 'nvidia-smi' | head -n1 | sed 's/ *$//')
ADAPTER_ARG=()
[ -n "$ADAPTER" ] && ADAPTER_ARG=(--adapter "$ADAPTER")

timeout 300 "$XENT" check "${ADAPTER_ARG[@]}" > "$OUT/check.txt" 2>&1; echo "check exit $?" >> "$OUT/check.txt"
tail -n 3 "$OUT/check.txt"

# Each line of a .jsonl: {"config": the XENT_* tuning overrides, "rows": xent bench's array}.
bench_line() { # config, then xent bench arguments
  local config="$1"; shift
  local json
  json=$(env $config timeout 240 "$XENT" bench --device gpu "${ADAPTER_ARG[@]}" --json "$@" 2>> "$OUT/bench.err" | tr -d '\n')
  printf '{"config": "%s", "rows": %s}\n' "$config" "${json:-null}"
}

timeout 300 "$XENT" bench --device all "${ADAPTER_ARG[@]}" --iters 20 --json > "$OUT/bench.json" 2>> "$OUT/bench.err"
{
  bench_line "" "${BIG[@]}" --iters "$ITERS"
  bench_line "" "${SPLIT[@]}" --iters 20
  # Few long rows on whole rows instead of the (row x column block) grid.
  bench_line XENT_FEW_ROWS=0 "${SPLIT[@]}" --iters 20
  # The linear head (an LLM's: 8192 tokens, D 4096, a 128K vocabulary), ÷gemm beside it;
  # its GEMM tile (GX x GY invocations, K step) and dh's K segments (dispatches of at most
  # this K, accumulating) swept on a smaller head, and the recompute path (G in the
  # GEMM's epilogue) against whole rows.
  bench_line "" --linear "${HEAD[@]}" --iters 3
  for config in "" XENT_GEMM_TILE=8x8x16 XENT_GEMM_TILE=16x16x8 XENT_GEMM_TILE=16x16x32 \
    XENT_GEMM_TILE=16x8x16 XENT_GEMM_TILE=32x8x16 XENT_GEMM_K_SEGMENT=1024 XENT_GEMM_K_SEGMENT=4096 \
    XENT_LINEAR_RECOMPUTE=1; do
    bench_line "$config" --linear "${HEAD_SWEEP[@]}" --iters 3
  done
} > "$OUT/bench_big.jsonl"
# The fused kernel's tuning on long rows: workgroup size, workgroups in flight (each
# looping over rows, so more of a row is still in L2 for its second read; H200: 132
# SMs and 60 MB of L2, rows of 512 KiB: 96 rows in flight are 48 MB), and the
# workgroup-memory merge instead of the subgroup one.
for config in "" XENT_WORKGROUP_SIZE=512 XENT_WORKGROUP_SIZE=1024 \
  XENT_MAX_WORKGROUPS=132 XENT_MAX_WORKGROUPS=264 XENT_MAX_WORKGROUPS=528 \
  "XENT_WORKGROUP_SIZE=1024 XENT_MAX_WORKGROUPS=96" "XENT_WORKGROUP_SIZE=1024 XENT_MAX_WORKGROUPS=132" \
  "XENT_WORKGROUP_SIZE=512 XENT_MAX_WORKGROUPS=264" \
  XENT_SUBGROUPS=0; do
  bench_line "$config" "${SWEEP[@]}" --iters "$ITERS"
done > "$OUT/sweep.jsonl"

if python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  timeout 300 python3 scripts/bench_torch_cuda.py --shapes "$TORCH_SHAPES" --iters "$ITERS" > "$OUT/torch.jsonl" 2>> "$OUT/bench.err"
else
  echo "no CUDA PyTorch here: no anchor" | tee "$OUT/torch.jsonl"
fi

python3 - "$OUT" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = []
try:
    rows += [("", r) for r in json.loads((out / "bench.json").read_text())]
except Exception as e:
    print("bench.json:", e)
for name in ["bench_big.jsonl", "sweep.jsonl", "torch.jsonl"]:
    for line in (out / name).read_text().splitlines() if (out / name).exists() else []:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if "config" in obj:
            rows += [(obj["config"] or "default", r) for r in obj["rows"] or []]
        else:
            rows.append((obj["impl"], obj))
print(f"{'config':<48} {'dev':<4} {'shape':>13} {'pass':<17} {'median ms':>10} {'÷copy':>7} {'÷read':>7}")
for config, r in rows:
    ratio = lambda k: f"{r[k]:.3f}" if r.get(k) is not None else "-"
    print(f"{config[:48]:<48} {r.get('device', ''):<4} {r['rows']:>6}x{r['classes']:<6} {r['pass']:<17} "
          f"{r['median_ms']:>10.3f} {ratio('ratio_to_copy'):>7} {ratio('ratio_to_read'):>7}")
EOF
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
