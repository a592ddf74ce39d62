#!/usr/bin/env bash
# How many training images the digits-det and digits-seg recipes need: several variants side by
# side on one GPU (the nano models are launch-bound there, so concurrent processes share it
# well), each cut off after LIMIT seconds, evaluating every epoch. Not part of CI.
#
# Usage (on the GPU machine; BUILD = scripts/cuda_build.sh's output, packed or not):
#   LIMIT=450 bash scripts/gpu_dense_recipes.sh BUILD OUT_DIR [INIT_RUN]
# INIT_RUN: a classification run folder for the `*-init` variants (e.g. the MNIST one of
# configs/finetune/swinv2_nano_mnist_64.yaml); without it they are skipped. Writes
# OUT_DIR/results.tar.gz (each run's metrics.jsonl, config.yaml, eval/final.json and log tail).
set -uo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "$2")
init=${3:-}
limit=${LIMIT:-450}
# shellcheck source=scripts/lib/cuda_bin.sh
source scripts/lib/cuda_bin.sh
cuda_bin "$1" # sets `build` and LD_LIBRARY_PATH
bin=$build/mimlab
mkdir -p "$out"
runs=$out/runs
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
lscpu | grep "Model name"
t0=$SECONDS
"$bin" data prepare digits-det || exit 1
echo "digits-det prepared in $((SECONDS - t0)) s"

seg=configs/segment/swinv2_nano_digits_seg.yaml
det=configs/detect/swinv2_nano_digits_det.yaml
common=(--set run.device=cuda --set run.threads=2 --set data.num_workers=2
    --set run.output_dir="$runs" --set run.eval_every_epochs=2 --set run.checkpoint_every_epochs=0
    --set run.image_every=0)
variants=(
    "seg-b32-lr2e-3|$seg|train.batch_size=32 train.epochs=24"
    "seg-b32-lr4e-3|$seg|train.batch_size=32 train.epochs=24 train.base_lr=4e-3"
    "seg-b8-lr2e-3|$seg|train.epochs=24"
    "seg-segformer-b32|$seg|train.batch_size=32 train.epochs=24 segment.head=segformer"
    "det-b32-lr2e-3|$det|train.batch_size=32 train.epochs=24"
    "det-b8-lr2e-3|$det|train.batch_size=8 train.epochs=24"
)
if [[ -n $init ]]; then
    variants+=(
        "seg-b32-init|$seg|train.batch_size=32 train.epochs=24 finetune.layer_decay=0.9"
        "det-b32-init|$det|train.batch_size=32 train.epochs=24 finetune.layer_decay=0.9"
    )
fi
for v in "${variants[@]}"; do
    IFS='|' read -r name config sets <<<"$v"
    args=(finetune --config "$config" "${common[@]}" --set run.name="$name")
    for s in $sets; do args+=(--set "$s"); done
    [[ $name == *-init ]] && args+=(--init "$init")
    (timeout "$limit" "$bin" "${args[@]}" >"$out/$name.log" 2>&1; echo "$name: exit $?") &
done
wait
echo "all done after $((SECONDS - t0)) s"
for v in "${variants[@]}"; do
    name=${v%%|*}
    python3 - "$runs/$name" <<'PY'
import sys
sys.path.insert(0, "scripts/lib")
from run_table import eval_rows, train_losses
run = sys.argv[1]
ev = eval_rows(run)
key = "mIoU" if any("mIoU" in r for r in ev) else "AP50"
print(run.rsplit("/", 1)[1], "steps", max(train_losses(run), default=0),
      [(r["step"], round(r.get(key, float("nan")), 3)) for r in ev])
PY
done
tar -czf "$out/results.tar.gz" --exclude checkpoints --exclude '*.png' --exclude 'events.out.*' \
    -C "$out" runs $(cd "$out" && ls ./*.log)
