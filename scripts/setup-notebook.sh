#!/usr/bin/env bash
# Installs the Python side of notebooks/analyze_runs.ipynb into a venv at the repo root.
#
#   scripts/setup-notebook.sh          -> .venv-notebook/ (git-ignored)
#
# Packages: notebooks/requirements.txt (tensorboard for its EventAccumulator, pyyaml, numpy,
# matplotlib, nbformat + nbclient to execute the notebook headless, ipykernel for its kernel;
# no TensorFlow, no torch), from PyPI through pip. The venv's kernel is registered inside the venv
# (`ipykernel install --sys-prefix`), so the venv's Python runs the cells.
# Idempotent: when the venv already imports every package and was made from the same
# requirements file, nothing is installed. Prints the venv's python on its last line.
set -euo pipefail

die() { echo "setup-notebook: error: $*" >&2; exit 1; }
note() { echo "setup-notebook: $*" >&2; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv-notebook"
req="$repo_root/notebooks/requirements.txt"
py="$venv/bin/python"
imports='import tensorboard.backend.event_processing.event_accumulator, yaml, numpy, matplotlib, nbformat, nbclient, ipykernel'

[ -f "$req" ] || die "$req is missing"
# one setup at a time (tests run in parallel threads)
mkdir -p "$venv"
if command -v flock >/dev/null; then
    exec 9>"$venv/.setup.lock"
    flock 9
fi
if [ -x "$py" ] && cmp -s "$req" "$venv/requirements.txt" && "$py" -c "$imports" 2>/dev/null \
    && [ -f "$venv/share/jupyter/kernels/python3/kernel.json" ]; then
    note "up to date: $venv"
else
    command -v python3 >/dev/null || die "python3 not found"
    if [ ! -x "$py" ]; then
        note "creating $venv"
        python3 -m venv "$venv" || die "python3 -m venv failed (Debian/Ubuntu: apt-get install python3-venv)"
    fi
    note "installing notebooks/requirements.txt into $venv (once)"
    "$py" -m pip install -q --disable-pip-version-check -r "$req" || die "pip install failed"
    "$py" -c "$imports" || die "the venv does not import the packages after installing them"
    # the kernelspec "python3" of this venv, found by jupyter_client through sys.prefix
    "$py" -m ipykernel install --sys-prefix --name python3 >/dev/null || die "ipykernel install failed"
    cp "$req" "$venv/requirements.txt"
    note "installed: $venv"
fi
echo "$py"
