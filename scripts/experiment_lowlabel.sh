#!/usr/bin/env bash
# The low-label experiment of EXPERIMENTS.md, end to end on CPU:
#   1. SimMIM-pretrain the 32 px nano Swin-V2 on all 60k Fashion-MNIST training images (labels
#      unused) for 20 epochs, with 8 px mask patches (the first-run recipe) and with 16 px ones
#      (the best frozen features of the AvgDist sweep), ratio 0.6; and 50 epochs with 8 px;
#   2. feature distillation: a random-init student distilled from the 16 px SimMIM encoder;
#   3. finetune with 1% and 10% of the labels from scratch, from the three SimMIM encoders and
#      from the FD student, 3 seeds each (run.seed = data.label_seed = seed: the seed also picks which
#      images carry labels), same recipe and budget (scratch without layer decay, as the
#      reference scratch recipe);
#   4. k-NN and linear probes of the random, SimMIM and FD encoders (1%, 10%, 100% labels);
#   5. classical raw-pixel baselines at the same label counts (scripts/lowlabel_baselines.sh);
#   6. the table, runs/lowlabel/results.md.
# Usage: bash scripts/experiment_lowlabel.sh [stage ...]
#   stages, in this order by default: pretrain-p8 pretrain-p16 pretrain-p8-50ep fd scratch ft-p8
#   ft-p16 ft-p8-50ep ft-fd probe baselines table
#   env: SEEDS (default "0 1 2"), THREADS (run.threads of every run; default 0 = all cores)
# Finished runs are skipped and interrupted ones resumed, so an interrupted run can simply be
# started again. Two invocations may share the work when their stages do not overlap (each
# with THREADS=1 on 2 cores), e.g. `pretrain-p8 ft-p8` and `scratch pretrain-p16 fd ft-p16 ft-fd`,
# then `probe baselines table`.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/lowlabel
SEEDS=${SEEDS:-"0 1 2"}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] &&
  STAGES=(pretrain-p8 pretrain-p16 pretrain-p8-50ep fd scratch ft-p8 ft-p16 ft-p8-50ep ft-fd
    probe baselines table)
want() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

bash scripts/setup-data.sh >/dev/null
cargo build --release -q
BIN=target/release/mimlab
T=(--set "run.threads=${THREADS:-0}")
mkdir -p "$OUT"
PRE8="$OUT/simmim-20ep-p8"
PRE16="$OUT/simmim-20ep-p16"
PRE8L="$OUT/simmim-50ep-p8"
FD="$OUT/fd-p16"
C1=configs/finetune/swinv2_nano_fmnist_1pct_200ep.yaml
C10=configs/finetune/swinv2_nano_fmnist_10pct_30ep.yaml

has_ckpt() { ls "$1"/checkpoints/step_*.json >/dev/null 2>&1; }

# train COMMAND RUN_DIR DONE_STEP [args...]: start, resume, or skip when DONE_STEP is saved
train() {
  local cmd=$1 dir=$2 last=$3; shift 3
  if [ -e "$dir/checkpoints/step_$last.json" ]; then echo "skip $dir (done)"; return; fi
  if has_ckpt "$dir"; then
    $BIN "$cmd" --resume "$dir" "${T[@]}"
  else
    $BIN "$cmd" "$@" --set run.output_dir="$(dirname "$dir")" --set run.name="$(basename "$dir")" "${T[@]}"
  fi
}

for p in 8 16; do
  if want pretrain-p$p; then
    train pretrain "$OUT/simmim-20ep-p$p" 18740 --config configs/simmim/swinv2_nano_fmnist_60k_20ep.yaml \
      --set simmim.mask_patch_size=$p --set simmim.mask_ratio=0.6
  fi
done
if want pretrain-p8-50ep; then
  train pretrain "$PRE8L" 46850 --config configs/simmim/swinv2_nano_fmnist_60k_50ep.yaml \
    --set simmim.mask_patch_size=8 --set simmim.mask_ratio=0.6
fi
if want fd; then
  train distill "$FD" 937 --config configs/fd/swinv2_nano_fmnist_60k.yaml --teacher "$PRE16"
fi

# finetune NAME CONFIG SEED [args...]: runs/lowlabel/NAME-sSEED, skipped when it has final.json
finetune() {
  local name=$1 cfg=$2 seed=$3; shift 3
  local dir="$OUT/$name-s$seed"
  if [ -e "$dir/eval/final.json" ]; then echo "skip $dir (done)"; return; fi
  if has_ckpt "$dir"; then
    $BIN finetune --resume "$dir" "${T[@]}"
  else
    $BIN finetune --config "$cfg" --set run.output_dir=$OUT --set run.name="$name-s$seed" \
      --set run.seed="$seed" --set data.label_seed="$seed" "${T[@]}" "$@"
  fi
}
arms() { # the finetunes of one init: NAME [args...]
  local name=$1; shift
  for s in $SEEDS; do
    finetune "$name-1pct" $C1 "$s" "$@"
    finetune "$name-10pct" $C10 "$s" "$@"
  done
}
if want scratch; then arms scratch --set finetune.layer_decay=1.0; fi
if want ft-p8; then arms simmim-p8 --init "$PRE8"; fi
if want ft-p16; then arms simmim-p16 --init "$PRE16"; fi
if want ft-p8-50ep; then arms simmim-50ep-p8 --init "$PRE8L"; fi
if want ft-fd; then arms fd --init "$FD"; fi

if want probe; then
  probe() { # NAME [--init RUN]
    local dir="$OUT/probe-$1"; shift
    [ -e "$dir/probe.json" ] || $BIN probe --config configs/finetune/swinv2_nano_fmnist.yaml \
      --fractions 0.01,0.1,1.0 --out "$dir" "${T[@]}" "$@"
  }
  probe random
  probe simmim-p8 --init "$PRE8"
  probe simmim-p16 --init "$PRE16"
  probe simmim-50ep-p8 --init "$PRE8L"
  probe fd --init "$FD"
fi
if want baselines; then
  [ -e "$OUT/baselines.json" ] || bash scripts/lowlabel_baselines.sh --out "$OUT/baselines.json"
fi

if want table; then
  python3 - "$OUT" "$SEEDS" <<'PY' | tee "$OUT/results.md"
import json, os, statistics, sys
out, seeds = sys.argv[1], sys.argv[2].split()
def load(p):
    p = os.path.join(out, p)
    return json.load(open(p)) if os.path.exists(p) else None
def stat(xs):
    if not xs: return "-"
    if len(xs) == 1: return f"{xs[0]:.2f} (1)"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f} ({len(xs)})"
def arm(name, tag):
    return [j["top1"] for s in seeds if (j := load(f"{name}-{tag}-s{s}/eval/final.json"))]
ARMS = [("scratch", "scratch"), ("SimMIM 8 px, 20 ep", "simmim-p8"),
        ("SimMIM 16 px, 20 ep", "simmim-p16"), ("SimMIM 8 px, 50 ep", "simmim-50ep-p8"),
        ("FD student (of SimMIM 16 px)", "fd")]
print("Finetuned top-1 % on the 10,000 test images, mean ± sd (seeds):\n")
print("| labels | " + " | ".join(a for a, _ in ARMS) + " |")
print("|---|" + "---|" * len(ARMS))
for tag, n in (("1pct", "1% (600)"), ("10pct", "10% (6,000)")):
    print(f"| {n} | " + " | ".join(stat(arm(k, tag)) for _, k in ARMS) + " |")
print("\nGain over scratch, mean of per-seed differences (same seed = same labelled images) ± sd:\n")
print("| labels | " + " | ".join(a for a, _ in ARMS[1:]) + " |")
print("|---|" + "---|" * (len(ARMS) - 1))
for tag, n in (("1pct", "1% (600)"), ("10pct", "10% (6,000)")):
    cells = []
    for _, k in ARMS[1:]:
        d = [a["top1"] - b["top1"] for s in seeds
             if (a := load(f"{k}-{tag}-s{s}/eval/final.json")) and (b := load(f"scratch-{tag}-s{s}/eval/final.json"))]
        cells.append(stat(d))
    print(f"| {n} | " + " | ".join(cells) + " |")
print("\nFrozen features (k-NN / linear probe top-1 %):\n")
PROBES = ("random", "simmim-p8", "simmim-p16", "simmim-50ep-p8", "fd")
print("| labels | random | SimMIM 8 px, 20 ep | SimMIM 16 px, 20 ep | SimMIM 8 px, 50 ep | FD student |")
print("|---|---|---|---|---|---|")
probes = {k: load(f"probe-{k}/probe.json") for k in PROBES}
for frac, n in ((0.01, "1%"), (0.1, "10%"), (1.0, "100%")):
    cells = []
    for k in PROBES:
        j = probes[k]
        r = [r for r in (j or {}).get("rows", []) if abs(r["label_fraction"] - frac) < 1e-9]
        cells.append(f"{r[0]['knn_top1']:.2f} / {r[0]['linear_top1']:.2f}" if r else "-")
    print(f"| {n} | " + " | ".join(cells) + " |")
b = load("baselines.json")
if b:
    print("\nRaw-pixel baselines at the same label counts (scikit-learn, 3 class-balanced subsets):\n")
    print("| labels | model | top-1 % |")
    print("|---|---|---|")
    for r in b["rows"]:
        print(f"| {r['labels']:,} | {r['model']} | {r['mean']:.2f} ± {r['sd']:.2f} ({len(r['top1'])}) |")
PY
fi
