#!/usr/bin/env bash
# The low-label experiment of EXPERIMENTS.md, end to end on CPU:
#   1. SimMIM-pretrain the 32px nano Swin-V2 on all 60k Fashion-MNIST training images (no labels);
#   2. k-NN and linear probe of the pretrained and of the random encoder (1%, 10%, 100% labels);
#   3. finetune with 1% and 10% of the labels from the pretrained encoder and from scratch
#      (same recipe and budget; scratch without layer decay, as the reference scratch recipe);
#   4. feature distillation (issue 8): distill a random-init student from the SimMIM encoder, then
#      finetune it with the same 1% / 10% recipes;
#   5. recipe check: the 1% runs again without Mixup/CutMix (pretrained and scratch);
#   6. print the table (also written to runs/lowlabel/results.md).
# Usage: bash scripts/experiment_lowlabel.sh [stage ...]
#   stages: pretrain probe finetune scratch fd nomix table
# (default: all). Finished stages are skipped, so an interrupted run can simply be started again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/lowlabel
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(pretrain probe finetune scratch fd nomix table)
want() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

bash scripts/setup-data.sh >/dev/null
cargo build -q
BIN=target/debug/mimlab
mkdir -p "$OUT"
PRE="$OUT/simmim-60k"

if want pretrain && [ ! -e "$PRE/checkpoints/step_4685.json" ]; then
  if [ -d "$PRE/checkpoints" ] && ls "$PRE"/checkpoints/step_*.json >/dev/null 2>&1; then
    $BIN pretrain --resume "$PRE"
  else
    $BIN pretrain --config configs/simmim/swinv2_nano_fmnist_60k.yaml \
      --set run.output_dir=$OUT --set run.name=simmim-60k
  fi
fi

finetune() { # name config [args...]
  local name=$1 cfg=$2; shift 2
  if [ -e "$OUT/$name/eval/final.json" ]; then echo "skip $name (done)"; return; fi
  if [ -d "$OUT/$name/checkpoints" ] && ls "$OUT/$name"/checkpoints/step_*.json >/dev/null 2>&1; then
    $BIN finetune --resume "$OUT/$name"
  else
    $BIN finetune --config "$cfg" --set run.output_dir=$OUT --set run.name="$name" "$@"
  fi
}

if want probe; then
  [ -e "$OUT/probe-random/probe.json" ] || $BIN probe --config configs/finetune/swinv2_nano_fmnist.yaml --out "$OUT/probe-random"
  [ -e "$OUT/probe-pretrained/probe.json" ] || $BIN probe --config configs/finetune/swinv2_nano_fmnist.yaml --init "$PRE" --out "$OUT/probe-pretrained"
fi
if want finetune; then
  finetune ft-1pct-pretrained configs/finetune/swinv2_nano_fmnist_1pct.yaml --init "$PRE"
  finetune ft-10pct-pretrained configs/finetune/swinv2_nano_fmnist_10pct.yaml --init "$PRE"
fi
if want scratch; then
  finetune ft-1pct-scratch configs/finetune/swinv2_nano_fmnist_1pct.yaml --set finetune.layer_decay=1.0
  finetune ft-10pct-scratch configs/finetune/swinv2_nano_fmnist_10pct.yaml --set finetune.layer_decay=1.0
fi

FD="$OUT/fd-60k"
if want fd; then
  if [ ! -e "$FD/checkpoints/step_937.json" ]; then
    $BIN distill --config configs/fd/swinv2_nano_fmnist_60k.yaml --teacher "$PRE" \
      --set run.output_dir=$OUT --set run.name=fd-60k
  fi
  finetune ft-1pct-fd configs/finetune/swinv2_nano_fmnist_1pct.yaml --init "$FD"
  finetune ft-10pct-fd configs/finetune/swinv2_nano_fmnist_10pct.yaml --init "$FD"
fi

if want nomix; then
  NOMIX=(--set finetune.mixup=0 --set finetune.cutmix=0)
  finetune ft-1pct-pretrained-nomix configs/finetune/swinv2_nano_fmnist_1pct.yaml --init "$PRE" "${NOMIX[@]}"
  finetune ft-1pct-scratch-nomix configs/finetune/swinv2_nano_fmnist_1pct.yaml --set finetune.layer_decay=1.0 "${NOMIX[@]}"
fi

if want table; then
  python3 - "$OUT" <<'PY' | tee "$OUT/results.md"
import json, os, sys
out = sys.argv[1]
def load(p):
    p = os.path.join(out, p)
    return json.load(open(p)) if os.path.exists(p) else None
def top1(name):
    j = load(f"{name}/eval/final.json")
    return f"{j['top1']:.2f}" if j else "-"
probe = {k: load(f"probe-{k}/probe.json") for k in ("pretrained", "random")}
def pr(kind, frac, key):
    j = probe[kind]
    if not j: return "-"
    r = [r for r in j["rows"] if abs(r["label_fraction"] - frac) < 1e-9]
    return f"{r[0][key]:.2f}" if r else "-"
print("| labels | finetune: SimMIM-pretrained | finetune: scratch | finetune: FD student | k-NN: pretrained | k-NN: random | linear: pretrained | linear: random |")
print("|---|---|---|---|---|---|---|---|")
for frac, tag, n in ((0.01, "1pct", "1% (600)"), (0.1, "10pct", "10% (6,000)"), (1.0, None, "100% (60,000)")):
    ft_p = top1(f"ft-{tag}-pretrained") if tag else "n/a"
    ft_s = top1(f"ft-{tag}-scratch") if tag else "n/a"
    ft_f = top1(f"ft-{tag}-fd") if tag else "n/a"
    print(f"| {n} | {ft_p} | {ft_s} | {ft_f} | {pr('pretrained', frac, 'knn_top1')} | {pr('random', frac, 'knn_top1')} | {pr('pretrained', frac, 'linear_top1')} | {pr('random', frac, 'linear_top1')} |")
print()
print(f"Without Mixup/CutMix, 1% labels: pretrained {top1('ft-1pct-pretrained-nomix')}, scratch {top1('ft-1pct-scratch-nomix')}")
print()
print("top-1 % on the 10,000 Fashion-MNIST test images.")
PY
fi
