#!/usr/bin/env bash
# Training throughput of the shipped CPU recipes as one rank on all threads against
# `run.cpu_ranks` in-process data-parallel ranks (one thread each): the median images/s of each
# run's logged steps after the first 20, alternating the two settings for --rounds rounds, as a
# markdown table naming the CPU. Nothing else should run meanwhile.
#
#   bash scripts/bench_cpu_ranks.sh [--threads 2] [--rounds 3] [--steps 120]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2 rounds=3 steps=120
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    *) echo "usage: $0 [--threads N] [--rounds R] [--steps S]" >&2; exit 2 ;;
  esac
done
cargo build --release --quiet
bin=target/release/mimlab
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
field() { grep -m1 "^$1" /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'; }
cpu="$(field "model name") (family $(field "cpu family") model $(field "model")$(grep -qw avx512f /proc/cpuinfo && echo ", AVX-512"))"
recipes=(
  "pretrain configs/simmim/swinv2_nano_fmnist.yaml"
  "finetune configs/finetune/swinv2_nano_fmnist.yaml"
  "finetune configs/detect/swinv2_nano_digits_det.yaml"
  "finetune configs/segment/swinv2_nano_digits_seg.yaml"
)
# median images/s of a run's train rows after step 20
rate() {
  python3 - "$1" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
v = [r["images_per_sec"] for r in rows if r.get("split") == "train" and r["step"] > 20]
print(f"{statistics.median(v):.1f}")
EOF
}
echo "CPU: $cpu; $threads threads; $steps steps per run; $rounds rounds (median images/s of steps 21-$steps)"
echo
echo "| recipe | 1 rank x $threads threads | $threads ranks x 1 thread | ratio |"
echo "|---|---|---|---|"
for r in "${recipes[@]}"; do
  read -r cmd cfg <<<"$r"
  one=() many=()
  for k in $(seq "$rounds"); do
    for ranks in 1 "$threads"; do
      name="r${ranks}_$k"
      "$bin" "$cmd" --config "$cfg" --set run.output_dir="$out" --set run.name="$name" \
        --set run.threads="$threads" --set run.cpu_ranks="$ranks" --set train.max_steps="$steps" \
        --set run.log_every=10 --set run.eval_every_epochs=0 --set run.best_metric=null \
        --set run.image_every=0 >"$out/$name.log" 2>&1 || { cat "$out/$name.log" >&2; exit 1; }
      v=$(rate "$out/$name/metrics.jsonl")
      if [ "$ranks" = 1 ]; then one+=("$v"); else many+=("$v"); fi
      rm -rf "${out:?}/$name"
    done
  done
  ratio=$(python3 -c "import statistics as s; print(f'{s.median([$(IFS=,; echo "${many[*]}")])/s.median([$(IFS=,; echo "${one[*]}")]):.2f}x')")
  echo "| \`$cfg\` | ${one[*]} | ${many[*]} | $ratio |"
done
