#!/usr/bin/env bash
# mimlab vs PyTorch, side by side on this machine: builds mimlab (release), installs torch, timm
# and torchvision (the detection rows' NMS and box losses) into a throwaway venv (.venv-bench/, on
# first use), runs both benches with the same thread count and prints one table with the ratio
# mimlab/PyTorch of images/s per row (> 1 = mimlab faster).
#
# Usage: bash scripts/bench_compare.sh [--threads N] [--rounds R] [any other `mimlab bench` flag,
#        e.g. --filter simmim --filter 'batch=8' --iters 3]
#   --rounds R (R > 1): each row runs R times in both tools, the two runs of a row one right after
#        the other (mimlab first in odd rounds, PyTorch first in even ones), so that both see the
#        machine in the same state; prints the median images/s of each tool and the median and
#        range of the per-round ratios. On a shared machine whose speed drifts by +-20% over
#        minutes this compares the tools, where one run of each (R = 1, the default: all mimlab
#        rows, then all PyTorch rows) also compares the minutes they ran in.
#        MIMLAB_BIN=path/to/mimlab bash scripts/bench_compare.sh ...   (another build, e.g. the
#        one scripts/candle_patched.sh makes; default: cargo build --release)
# Not part of CI. The venv is ~5.5 GiB (PyPI's torch wheel pulls the CUDA libraries; it runs on
# the CPU all the same); delete .venv-bench/ to reclaim it. Results: target/bench/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."

threads=$(nproc)
rounds=1
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --threads=*) threads="${1#*=}"; shift ;;
        --rounds) rounds="$2"; shift 2 ;;
        --rounds=*) rounds="${1#*=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done

venv=.venv-bench
if ! "$venv/bin/python" -c 'import torch, timm, torchvision' 2>/dev/null; then
    echo "installing torch + timm + torchvision into $venv (once; several GiB)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q torch timm torchvision
fi

if [[ -n "${MIMLAB_BIN:-}" ]]; then
    bin="$MIMLAB_BIN"
else
    cargo build --release --quiet
    bin="${CARGO_TARGET_DIR:-target}/release/mimlab"
fi
out="${CARGO_TARGET_DIR:-target}/bench"
mkdir -p "$out"

if ! [[ "$rounds" =~ ^[1-9][0-9]*$ ]]; then
    echo "bench_compare.sh: --rounds must be a positive integer, got '$rounds'" >&2
    exit 2
fi
if (( rounds > 1 )); then
    exec python3 scripts/bench_rounds.py --bin "$bin" --python "$venv/bin/python" \
        --threads "$threads" --rounds "$rounds" --out "$out" -- "${args[@]}"
fi

echo "== mimlab ($threads threads)" >&2
"$bin" bench --threads "$threads" --json "$out/mimlab.json" "${args[@]}"
echo "== pytorch ($threads threads)" >&2
"$venv/bin/python" scripts/bench_pytorch.py --threads "$threads" --json "$out/pytorch.json" "${args[@]}"

python3 scripts/bench_table.py "$out/mimlab.json" "$out/pytorch.json"
