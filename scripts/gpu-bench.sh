#!/usr/bin/env bash
# One prepared run on a lent GPU machine (the `device` tool): Vulkan loader, build (or a
# carried binary), `xent info`, `xent check`, `xent bench --json` with the default shapes
# plus 8192 x 131072 and 2 x 262144, the subgroup merge against the workgroup tree at
# 1024 x 32000 — everything under $OUT.
#
# Prepare here, once (x86-64 machine, in the repo root):
#   echo /.gl/ >>.git/info/exclude; echo /.gpubin/ >>.git/info/exclude
#   mkdir -p .gl /tmp/amd64/partial; o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
#   apt-get $o update; (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
#   cargo build --release && mkdir -p .gpubin && cp target/release/xent .gpubin/
# Then run with carry [".gl", ".gpubin"] and command `bash scripts/gpu-bench.sh`.
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

if command -v cargo >/dev/null 2>&1; then
  cargo build --release && XENT=target/release/xent
else
  XENT="${XENT_BIN:-.gpubin/xent}"
fi
[ -x "$XENT" ] || { echo "no xent binary (build here or carry .gpubin/xent)"; exit 1; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1 || true
"$XENT" info > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"
ADAPTER=$(grep -m1 -io 'nvidia[^(]*' "$OUT/info.txt" | head -n1 | sed 's/ *$//')
ADAPTER_ARG=()
[ -n "$ADAPTER" ] && ADAPTER_ARG=(--adapter "$ADAPTER")

timeout 300 "$XENT" check "${ADAPTER_ARG[@]}" > "$OUT/check.txt" 2>&1; echo "check exit $?" >> "$OUT/check.txt"
tail -n 3 "$OUT/check.txt"
timeout 300 "$XENT" bench --device all "${ADAPTER_ARG[@]}" --iters 20 --json > "$OUT/bench.json" 2> "$OUT/bench.err"
timeout 300 "$XENT" bench --device gpu "${ADAPTER_ARG[@]}" --rows 8192 --classes 131072 --iters 10 --json > "$OUT/bench_8192x131072.json" 2>> "$OUT/bench.err"
timeout 120 "$XENT" bench --device gpu "${ADAPTER_ARG[@]}" --rows 2 --classes 262144 --iters 20 --json > "$OUT/bench_2x262144.json" 2>> "$OUT/bench.err"
# The same long-row shape with the workgroup-memory merge instead of the subgroup one.
XENT_SUBGROUPS=0 timeout 120 "$XENT" bench --device gpu "${ADAPTER_ARG[@]}" --rows 1024 --classes 32000 --iters 20 --json > "$OUT/bench_1024x32000_tree.json" 2>> "$OUT/bench.err"
timeout 120 "$XENT" bench --device gpu "${ADAPTER_ARG[@]}" --rows 1024 --classes 32000 --iters 20 --json > "$OUT/bench_1024x32000_subgroups.json" 2>> "$OUT/bench.err"
cat "$OUT"/bench*.json
echo "results in $OUT"
