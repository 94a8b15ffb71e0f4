#!/usr/bin/env bash
# Bounded fuzzing (cargo-fuzz / libFuzzer, AddressSanitizer) of the .npy reader and the
# command-line option parser: `scripts/fuzz.sh [seconds per target, default 60]`.
# Seeds: fuzz/seeds/<target>/ (committed); the growing corpus, fuzz/corpus/, is not.
# Findings land in fuzz/artifacts/<target>/; the run fails if a target crashes.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz
# cargo-fuzz passes nightly-only compiler flags (-Zsanitizer); on a stable toolchain
# allow them explicitly.
rustc --version | grep -q nightly || export RUSTC_BOOTSTRAP=1
for target in npy options; do
  echo "== fuzzing $target for ${seconds}s"
  mkdir -p "fuzz/corpus/$target"
  cp -n fuzz/seeds/"$target"/* "fuzz/corpus/$target/"
  cargo fuzz run "$target" "fuzz/corpus/$target" -- -max_total_time="$seconds" -rss_limit_mb=4096 -max_len=4096
done
echo "fuzzing done: no crash"
