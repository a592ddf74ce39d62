#!/usr/bin/env bash
# The detection experiment of EXPERIMENTS.md, end to end on CPU: does a SimMIM-pretrained backbone
# beat training the detector from scratch, on the same budget?
#   1. SimMIM-pretrain the nano Swin-V2 on the unlabelled training images of each dataset
#      (configs/simmim/swinv2_nano_digits_det.yaml, configs/simmim/swinv2_nano_trees.yaml);
#   2. finetune the detection recipe (configs/detect/swinv2_nano_{digits_det,trees}.yaml) from that
#      pretraining and from scratch, seeds 0 and 1 (`run.seed`: the init of the neck and head,
#      the data order and the augmentation);
#   3. print the table (also written to runs/detection/results.md): AP, AP50 and wall minutes
#      (training, evaluations and report) per run, mean and standard deviation over the seeds.
# Usage: bash scripts/experiment_detection.sh [stage ...]
#   stages: pretrain finetune table (default: all). Finished runs are skipped and an interrupted run
#   resumes, so the script can simply be started again.
# Env: MIMLAB_BIN (default: target/release/mimlab, built here), SEEDS (default "0 1"),
#      DATASETS (default "digits_det trees"), FINETUNE_SETS (extra `--set` overrides for every
#      finetuning run, space-separated, e.g. "train.epochs=6" for a shorter common budget; the
#      table's steps column shows what each run did), OUT (default runs/detection).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/detection}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(pretrain finetune table)
want() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
SEEDS=${SEEDS:-"0 1"}
DATASETS=${DATASETS:-"digits_det trees"}

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

pretrain() { # dataset
  local name=simmim-$1 dir="$OUT/simmim-$1"
  if [ -e "$dir/done" ]; then echo "skip $name (done)"; return; fi
  if resumable "$dir"; then
    $BIN pretrain --resume "$dir"
  else
    $BIN pretrain --config "configs/simmim/swinv2_nano_$1.yaml" \
      --set run.output_dir=$OUT --set run.name="$name"
  fi
  touch "$dir/done"
}

finetune() { # dataset init seed
  local ds=$1 init=$2 seed=$3 name="det-$1-$2-s$3" args=()
  local dir="$OUT/$name"
  if finished "$dir"; then echo "skip $name (done)"; return; fi
  local t0
  t0=$(date +%s)
  if resumable "$dir"; then
    $BIN finetune --resume "$dir"
    echo $(($(date +%s) - t0)) >>"$dir/wall_s"
    return
  fi
  # the recipes train from scratch without layer-wise lr decay (nothing pretrained to protect, as
  # the reference's scratch recipes); a pretrained backbone gets the reference's finetuning decay
  if [ "$init" = simmim ]; then
    args=(--init "$OUT/simmim-$ds" --set finetune.layer_decay=0.9)
  fi
  local s
  for s in ${FINETUNE_SETS:-}; do args+=(--set "$s"); done
  $BIN finetune --config "configs/detect/swinv2_nano_$ds.yaml" --set run.output_dir=$OUT \
    --set run.name="$name" --set run.seed="$seed" ${args[@]+"${args[@]}"}
  echo $(($(date +%s) - t0)) >>"$dir/wall_s"
}

if want pretrain; then
  for ds in $DATASETS; do pretrain "$ds"; done
fi
if want finetune; then
  for ds in $DATASETS; do
    for seed in $SEEDS; do
      for init in scratch simmim; do finetune "$ds" "$init" "$seed"; done
    done
  done
fi

if want table; then
  python3 - "$OUT" <<'PY' | tee "$OUT/results.md"
import glob, json, os, sys
sys.path.insert(0, "scripts/lib")
from run_table import minutes, ms, steps
out = sys.argv[1]

print("| dataset | init | seeds | steps x batch | AP | AP50 | minutes | per seed AP50 |")
print("|---|---|---|---|---|---|---|---|")
for ds in ["digits_det", "trees"]:
    for init in ["scratch", "simmim"]:
        runs = sorted(glob.glob(os.path.join(out, f"det-{ds}-{init}-s*")))
        rows = []
        for r in runs:
            p = os.path.join(r, "eval", "final.json")
            if not os.path.exists(p):
                continue
            c = json.load(open(p))["coco"]
            rows.append((os.path.basename(r), c["AP"], c["AP50"], minutes(r), steps(r)))
        if not rows:
            continue
        budget = ", ".join(sorted({r[4] for r in rows}))
        print(f"| {ds} | {init} | {len(rows)} | {budget} | {ms([r[1] for r in rows])} | "
              f"{ms([r[2] for r in rows])} | {ms([r[3] for r in rows], 1)} | "
              + ", ".join(f"{r[2]:.3f}" for r in rows) + " |")
PY
fi
