#!/usr/bin/env bash
# Classical raw-pixel baselines at the low-label experiment's label counts (EXPERIMENTS.md):
# scikit-learn in a throwaway venv (.venv-baselines/, ~150 MiB), then scripts/lowlabel_baselines.py.
# Usage: bash scripts/lowlabel_baselines.sh [--out runs/lowlabel/baselines.json] [--seeds 0,1,2]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-data.sh >/dev/null
venv=.venv-baselines
if ! "$venv/bin/python" -c 'import sklearn, numpy' 2>/dev/null; then
    echo "installing scikit-learn + numpy into $venv (once)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'scikit-learn>=1.3' 'numpy>=1.24'
fi
exec "$venv/bin/python" scripts/lowlabel_baselines.py "$@"
