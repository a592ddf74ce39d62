#!/usr/bin/env bash
# Fault injection: `kill -9` at random moments, and inside checkpoint writes (issue 21).
#
# Reference: one uninterrupted `mimlab pretrain` of STEPS steps (a checkpoint every step).
# Each trial starts the same run and kills it with SIGKILL, then resumes it with `--resume`,
# killing the resumed process too while fewer than KILLS kills have landed, until a resume
# finishes. A kill lands either at a random moment (a uniform delay) or inside a write (the
# script polls `checkpoints/` and kills as soon as a `*.tmp` appears). A trial survives when:
#  - every resume starts (no error),
#  - the final weights and optimizer files equal the reference's byte for byte,
#  - `metrics.jsonl` holds each train step once, in order, and equals the reference's losses,
#  - no orphan piece (a `step_N.*` without its JSON) and no `*.tmp` is left in `checkpoints/`.
#
# Usage: scripts/fault_kill_resume.sh [TRIALS] [KILLS_PER_TRIAL] [MIMLAB_BINARY]
#   defaults 10 trials x 3 kills; binary: target/release/mimlab, else target/debug/mimlab.
set -u
cd "$(dirname "$0")/.."
TRIALS=${1:-10}
KILLS=${2:-3}
BIN=${3:-}
if [ -z "$BIN" ]; then
  if [ -x target/release/mimlab ]; then BIN=target/release/mimlab; else BIN=target/debug/mimlab; fi
fi
[ -x "$BIN" ] || { echo "no mimlab binary at $BIN (cargo build --release)"; exit 2; }
CONFIG=configs/simmim/swinv2_nano_fmnist.yaml
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STEPS=24
SMALL=(--set data.max_samples=512 --set train.batch_size=16 --set train.max_steps=$STEPS
       --set run.checkpoint_every_steps=1 --set run.keep_checkpoints=2 --set run.image_every=0
       --set run.log_every=1 --set run.threads=1)

ref=$WORK/ref
"$BIN" pretrain --config $CONFIG "${SMALL[@]}" --set run.output_dir="$ref" --set run.name=r \
  >"$WORK/ref.log" 2>&1 || { echo "reference run failed:"; tail -5 "$WORK/ref.log"; exit 1; }
START=$(date +%s.%N)
"$BIN" pretrain --config $CONFIG "${SMALL[@]}" --set run.output_dir="$WORK/timing" \
  --set run.name=t >/dev/null 2>&1
RUN_S=$(python3 -c "import time; print(max(1.0, time.time() - $START))")
train_losses() { python3 -c '
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(" ".join("%d:%r" % (r["step"], r["loss"]) for r in rows if r["split"] == "train"))' "$1"; }
REF_LOSSES=$(train_losses "$ref/r/metrics.jsonl")

tried=0 survived=0 in_write=0 random_kills=0
for i in $(seq 1 "$TRIALS"); do
  out=$WORK/t$i
  dir=$out/k
  kills=0 broken=""
  args=(pretrain --config $CONFIG "${SMALL[@]}" --set run.output_dir="$out" --set run.name=k)
  while :; do
    "$BIN" "${args[@]}" >>"$out.log" 2>&1 &
    pid=$!
    if [ "$kills" -lt "$KILLS" ]; then
      landed=""
      if [ $((RANDOM % 2)) = 0 ]; then
        # inside a write: killed as soon as a checkpoint temp file shows (safetensors'
        # `.tmpXXXX`, then mimlab's `.step_N.*.tmp` until its rename)
        for _ in $(seq 1 6000); do
          if ls -A "$dir/checkpoints" 2>/dev/null | grep -q '\.tmp'; then
            kill -9 $pid 2>/dev/null && landed=write
            break
          fi
          kill -0 $pid 2>/dev/null || break
          sleep 0.001
        done
      else
        sleep "$(python3 -c "import random; print(random.uniform(0.05, $RUN_S))")"
        kill -9 $pid 2>/dev/null && landed=random
      fi
      if wait $pid 2>/dev/null; then
        [ -z "$landed" ] && break # the run finished before the kill
      elif [ -z "$landed" ]; then
        broken="run failed without a kill: $(tail -2 "$out.log")"
        break
      fi
      case $landed in
        write) in_write=$((in_write + 1)) ;;
        random) random_kills=$((random_kills + 1)) ;;
      esac
      [ -n "$landed" ] && { kills=$((kills + 1)); tried=$((tried + 1)); }
    else
      wait $pid || { broken="resume failed: $(tail -2 "$out.log")"; break; }
      break
    fi
    # next attempt resumes; a kill before the first checkpoint leaves nothing to resume yet
    if ls "$dir/checkpoints"/step_*.json >/dev/null 2>&1; then
      args=(pretrain --resume "$dir")
    else
      rm -rf "$dir"
      args=(pretrain --config $CONFIG "${SMALL[@]}" --set run.output_dir="$out" --set run.name=k)
    fi
  done
  ck=$dir/checkpoints
  if [ -z "$broken" ]; then
    cmp -s "$ck/step_$STEPS.safetensors" "$ref/r/checkpoints/step_$STEPS.safetensors" \
      || broken="final weights differ from the uninterrupted run"
    cmp -s "$ck/step_$STEPS.optim.safetensors" "$ref/r/checkpoints/step_$STEPS.optim.safetensors" \
      || broken="${broken:+$broken; }final optimizer state differs"
    [ "$(train_losses "$dir/metrics.jsonl")" = "$REF_LOSSES" ] \
      || broken="${broken:+$broken; }metrics.jsonl differs"
    if ls -A "$ck" | grep -q '\.tmp$'; then broken="${broken:+$broken; }leftover *.tmp"; fi
    for f in "$ck"/step_*; do
      s=${f##*/step_}; s=${s%%.*}
      [ -e "$ck/step_$s.json" ] || broken="${broken:+$broken; }orphan $f"
    done
  fi
  if [ -z "$broken" ]; then
    survived=$((survived + kills))
    echo "trial $i: $kills kills, resumed bit-identical"
  else
    echo "trial $i: $kills kills, BROKEN: $broken"
  fi
done
echo "kills survived / tried: $survived / $tried ($in_write inside a checkpoint write, $random_kills at random moments)"
[ "$survived" = "$tried" ]
