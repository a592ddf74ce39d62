#!/usr/bin/env bash
# The segmentation experiments of EXPERIMENTS.md on digits-seg, end to end on CPU:
#   - does a SimMIM-pretrained backbone beat training the segmentor from scratch, on the same
#     budget (UPerNet, the recipe configs/segment/swinv2_nano_digits_seg.yaml)?
#   - UPerNet against the light SegFormer head (`segment.head: segformer`, same width), from
#     scratch.
# Steps:
#   1. SimMIM-pretrain the nano Swin-V2 on the unlabelled digits canvases
#      (configs/simmim/swinv2_nano_digits_det.yaml: the same images as digits-seg; reused from
#      scripts/experiment_detection.sh when it already ran into the same OUT);
#   2. finetune seeds 0 and 1 (`run.seed`: the init of the heads, the data order and the
#      augmentation) of the arms upernet-scratch, upernet-simmim, segformer-scratch;
#   3. print the table (also written to OUT/results.md): mIoU, mAcc, aAcc, the eval loss (decode
#      head, on the served maps) and wall minutes per run, mean and standard deviation over the
#      seeds.
# Usage: bash scripts/experiment_segmentation.sh [stage ...]
#   stages: pretrain finetune table (default: all). Finished runs are skipped and an interrupted
#   run resumes, so the script can simply be started again.
# Env: MIMLAB_BIN (default: target/release/mimlab, built here), SEEDS (default "0 1"), ARMS
#      (default "upernet-scratch upernet-simmim segformer-scratch"), FINETUNE_SETS (extra `--set`
#      overrides for every finetuning run, e.g. "train.epochs=2" for a shorter common budget),
#      PARALLEL (default 1: runs one after another; 2: two runs side by side, one thread each, so
#      that the two seeds of an arm see the same machine), OUT (default runs/segmentation).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/segmentation}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(pretrain finetune table)
want() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
SEEDS=${SEEDS:-"0 1"}
ARMS=${ARMS:-"upernet-scratch upernet-simmim segformer-scratch"}
PARALLEL=${PARALLEL:-1}

bash scripts/setup-data.sh >/dev/null
if [ -z "${MIMLAB_BIN:-}" ]; then
  cargo build -q --release --bin mimlab
  MIMLAB_BIN=target/release/mimlab
fi
BIN=$MIMLAB_BIN
mkdir -p "$OUT"

# finished, resumable
# shellcheck source=scripts/lib/runs.sh
source scripts/lib/runs.sh

pretrain() {
  local name=simmim-digits_det dir="$OUT/simmim-digits_det"
  if [ -e "$dir/done" ]; then echo "skip $name (done)"; return; fi
  if resumable "$dir"; then
    $BIN pretrain --resume "$dir"
  else
    $BIN pretrain --config configs/simmim/swinv2_nano_digits_det.yaml \
      --set run.output_dir="$OUT" --set run.name="$name"
  fi
  touch "$dir/done"
}

finetune() { # arm seed
  local arm=$1 seed=$2 name="seg-$1-s$2" args=()
  local dir="$OUT/$name" head=${1%-*} init=${1#*-}
  if finished "$dir"; then echo "skip $name (done)"; return; fi
  # side by side: one thread and one rank each (the recipe trains as two ranks on its own)
  if [ "$PARALLEL" -gt 1 ]; then args+=(--set run.threads=1 --set run.cpu_ranks=1 --set data.num_workers=1); fi
  local t0
  t0=$(date +%s)
  if resumable "$dir"; then
    $BIN finetune --resume "$dir" ${args[@]+"${args[@]}"}
    echo $(($(date +%s) - t0)) >>"$dir/wall_s"
    return
  fi
  # from scratch without layer-wise lr decay (as the recipe); a pretrained backbone gets the
  # reference's finetuning decay 0.9
  if [ "$init" = simmim ]; then
    args+=(--init "$OUT/simmim-digits_det" --set finetune.layer_decay=0.9)
  fi
  local s
  for s in ${FINETUNE_SETS:-}; do args+=(--set "$s"); done
  $BIN finetune --config configs/segment/swinv2_nano_digits_seg.yaml --set run.output_dir="$OUT" \
    --set run.name="$name" --set run.seed="$seed" --set segment.head="$head" \
    ${args[@]+"${args[@]}"} >"$OUT/$name.log" 2>&1
  echo $(($(date +%s) - t0)) >>"$dir/wall_s"
}

if want pretrain; then pretrain; fi
if want finetune; then
  jobs=()
  for arm in $ARMS; do
    for seed in $SEEDS; do jobs+=("$arm $seed"); done
  done
  i=0
  while [ $i -lt ${#jobs[@]} ]; do
    pids=()
    for ((k = 0; k < PARALLEL && i < ${#jobs[@]}; k++, i++)); do
      # shellcheck disable=SC2086
      finetune ${jobs[$i]} &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
  done
fi

if want table; then
  python3 - "$OUT" <<'PY' | tee "$OUT/results.md"
import glob, json, os, sys
sys.path.insert(0, "scripts/lib")
from run_table import minutes, ms, steps
out = sys.argv[1]

print("| head | init | seeds | steps x batch | mIoU | mAcc | aAcc | eval loss | minutes | per seed mIoU |")
print("|---|---|---|---|---|---|---|---|---|---|")
for arm in ["upernet-scratch", "upernet-simmim", "segformer-scratch", "segformer-simmim"]:
    rows = []
    for r in sorted(glob.glob(os.path.join(out, f"seg-{arm}-s*"))):
        p = os.path.join(r, "eval", "final.json")
        if not os.path.isdir(r) or not os.path.exists(p):
            continue
        j = json.load(open(p))
        rows.append((j["mIoU"], j["aAcc"], minutes(r), steps(r), j["mAcc"], j["loss"]))
    if not rows:
        continue
    head, init = arm.split("-")
    budget = ", ".join(sorted({r[3] for r in rows}))
    print(f"| {head} | {init} | {len(rows)} | {budget} | {ms([r[0] for r in rows])} | "
          f"{ms([r[4] for r in rows])} | {ms([r[1] for r in rows])} | "
          f"{ms([r[5] for r in rows])} | {ms([r[2] for r in rows], 1)} | "
          + ", ".join(f"{r[0]:.3f}" for r in rows) + " |")
PY
fi
