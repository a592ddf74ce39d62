#!/usr/bin/env bash
# Fault injection: concurrent runs on one run folder (issue 21, defect 2).
#
# Each trial starts two `mimlab pretrain` runs at the same moment:
#  - named:   both with run.name=conc (different seeds). Exactly one must train; the other must
#             fail at once with an error naming the folder and the other run's pid. The folder
#             must then be one run's, whole: config.yaml of the winner's seed, complete
#             checkpoints (JSON + both safetensors files), `latest` naming the newest, no *.tmp,
#             metrics.jsonl with strictly increasing steps, and `--resume` of it must succeed.
#  - unnamed: no run.name, so both pick `simmim-<UTC second>`; both must train, each in its own
#             folder.
# A trial that breaks any of these counts as a corruption.
#
# Usage: scripts/fault_concurrent_runs.sh [TRIALS] [MIMLAB_BINARY]
#   TRIALS (default 5) of each kind; the binary defaults to target/release/mimlab, else
#   target/debug/mimlab (build it first: cargo build --release).
set -u
cd "$(dirname "$0")/.."
TRIALS=${1:-5}
BIN=${2:-}
if [ -z "$BIN" ]; then
  if [ -x target/release/mimlab ]; then BIN=target/release/mimlab; else BIN=target/debug/mimlab; fi
fi
[ -x "$BIN" ] || { echo "no mimlab binary at $BIN (cargo build --release)"; exit 2; }
CONFIG=configs/simmim/swinv2_nano_fmnist.yaml
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SMALL=(--set data.max_samples=256 --set train.batch_size=16 --set train.max_steps=6
       --set run.checkpoint_every_steps=2 --set run.keep_checkpoints=2 --set run.image_every=0
       --set run.log_every=1 --set run.threads=1)

named_ok=0 named_bad=0 unnamed_ok=0 unnamed_bad=0
fail() { echo "  trial $1: CORRUPTION: $2"; }

check_folder() { # DIR SEED -> 0 if the folder is one run's, whole
  local dir=$1 seed=$2 ck=$1/checkpoints
  grep -q "^  seed: $seed\$" "$dir/config.yaml" || { echo "config.yaml is not seed $seed"; return 1; }
  [ "$(cat "$ck/latest" 2>/dev/null)" = step_6 ] || { echo "latest is not step_6"; return 1; }
  if ls -A "$ck" | grep -q '\.tmp$'; then echo "leftover *.tmp"; return 1; fi
  for j in "$ck"/step_*.json; do
    local s=${j%.json}
    [ -s "$s.safetensors" ] && [ -s "$s.optim.safetensors" ] || { echo "incomplete $s"; return 1; }
  done
  for f in "$ck"/step_*; do
    local s=${f##*/step_}; s=${s%%.*}
    [ -e "$ck/step_$s.json" ] || { echo "orphan $f"; return 1; }
  done
  python3 - "$dir/metrics.jsonl" <<'PY' || return 1
import json, sys
steps = [json.loads(l)["step"] for l in open(sys.argv[1]) if '"train"' in l]
if steps != sorted(set(steps)) or steps[-1] != 6:
    sys.exit(f"metrics.jsonl train steps {steps}")
PY
  "$BIN" pretrain --resume "$dir" --set train.max_steps=7 >"$dir.resume.log" 2>&1 \
    || { echo "resume failed: $(tail -2 "$dir.resume.log")"; return 1; }
}

for i in $(seq 1 "$TRIALS"); do
  out=$WORK/named$i
  "$BIN" pretrain --config $CONFIG "${SMALL[@]}" --set run.output_dir="$out" \
    --set run.name=conc --set run.seed=1 >"$WORK/a$i.log" 2>&1 & pa=$!
  "$BIN" pretrain --config $CONFIG "${SMALL[@]}" --set run.output_dir="$out" \
    --set run.name=conc --set run.seed=2 >"$WORK/b$i.log" 2>&1 & pb=$!
  wait $pa; ra=$?; wait $pb; rb=$?
  if [ $ra -eq 0 ] && [ $rb -ne 0 ]; then win=1 lose=b lpid=$pa wpid=$pa
  elif [ $rb -eq 0 ] && [ $ra -ne 0 ]; then win=2 lose=a lpid=$pb wpid=$pb
  else
    fail "named $i" "exit codes $ra and $rb (want one 0): $(tail -1 "$WORK/a$i.log") | $(tail -1 "$WORK/b$i.log")"
    named_bad=$((named_bad+1)); continue
  fi
  if ! grep -q "run folder $out/conc is in use by another run (pid $wpid" "$WORK/$lose$i.log"; then
    fail "named $i" "loser's error: $(tail -1 "$WORK/$lose$i.log")"; named_bad=$((named_bad+1)); continue
  fi
  if msg=$(check_folder "$out/conc" $win); then
    named_ok=$((named_ok+1)); echo "  trial named $i: ok (seed $win trained, the other was refused)"
  else fail "named $i" "$msg"; named_bad=$((named_bad+1)); fi
done

for i in $(seq 1 "$TRIALS"); do
  out=$WORK/unnamed$i
  "$BIN" pretrain --config $CONFIG "${SMALL[@]}" --set run.output_dir="$out" \
    --set run.seed=1 >"$WORK/ua$i.log" 2>&1 & pa=$!
  "$BIN" pretrain --config $CONFIG "${SMALL[@]}" --set run.output_dir="$out" \
    --set run.seed=2 >"$WORK/ub$i.log" 2>&1 & pb=$!
  wait $pa; ra=$?; wait $pb; rb=$?
  dirs=$(find "$out" -mindepth 1 -maxdepth 1 -type d | sort)
  n=$(echo "$dirs" | grep -c .)
  bad=""
  [ $ra -eq 0 ] && [ $rb -eq 0 ] || bad="exit codes $ra and $rb"
  [ -z "$bad" ] && [ "$n" -ne 2 ] && bad="$n run folders"
  if [ -z "$bad" ]; then
    seeds=""
    for d in $dirs; do
      s=$(sed -n 's/^  seed: //p' "$d/config.yaml"); seeds="$seeds$s"
      msg=$(check_folder "$d" "$s") || { bad="$d: $msg"; break; }
    done
    [ -z "$bad" ] && [ "$seeds" != 12 ] && [ "$seeds" != 21 ] && bad="seeds $seeds"
  fi
  if [ -z "$bad" ]; then
    unnamed_ok=$((unnamed_ok+1)); echo "  trial unnamed $i: ok ($(echo $dirs | xargs -n1 basename | tr '\n' ' '))"
  else fail "unnamed $i" "$bad"; unnamed_bad=$((unnamed_bad+1)); fi
done

echo "named run.name=conc: $TRIALS trials, $named_bad corruptions"
echo "unnamed same-second: $TRIALS trials, $unnamed_bad corruptions"
[ $named_bad -eq 0 ] && [ $unnamed_bad -eq 0 ]
