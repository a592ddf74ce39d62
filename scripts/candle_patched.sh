#!/usr/bin/env bash
# Builds mimlab against candle-core 0.11.1 with patches/candle-core-0.11.1-cpu.patch applied: the
# three changes to candle's CPU internals that BENCHMARKS.md ("What would close the rest of the
# gap") measures. Not the default build and not part of CI: the patch is meant for candle upstream.
#
#   1. backprop: the first gradient of a node is stored as is, instead of zeros_like + add.
#   2. CPU matmul: the output is not zero-filled before gemm overwrites it.
#   3. elementwise ops run on rayon's pool (gemm's) instead of candle's second, spinning pool.
#
# Usage: bash scripts/candle_patched.sh      # -> target/candle-patched/release/mimlab
#        MIMLAB_BIN=target/candle-patched/release/mimlab bash scripts/bench_compare.sh [flags]
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.11.1
patch_file="patches/candle-core-$version-cpu.patch"
cargo fetch --quiet
src=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -mindepth 2 -maxdepth 2 -type d \
    -name "candle-core-$version" | head -n 1)
if [[ -z "$src" ]]; then
    echo "candle-core $version is not in the cargo registry cache (cargo fetch failed?)" >&2
    exit 1
fi
dst="target/candle-core-$version-patched"
rm -rf "$dst"
mkdir -p target
cp -r "$src" "$dst"
chmod -R u+w "$dst"
patch --quiet -d "$dst" -p1 < "$patch_file"

# cargo rewrites Cargo.lock for a patched source; put the repository's back afterwards.
cp Cargo.lock target/Cargo.lock.unpatched
trap 'cp target/Cargo.lock.unpatched Cargo.lock' EXIT
CARGO_TARGET_DIR=target/candle-patched cargo build --release \
    --config "patch.crates-io.candle-core.path=\"$dst\""
echo "built target/candle-patched/release/mimlab (candle-core $version + $patch_file)" >&2
