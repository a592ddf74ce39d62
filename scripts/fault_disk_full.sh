#!/usr/bin/env bash
# Fault injection: the disk fills up during a run (issue 21). Needs root (mounts a tmpfs).
#
# Each trial mounts a tmpfs of SIZE (a range of sizes, so that the disk fills in different
# files: config, events, metrics, the weights, the optimizer file, the JSON) and runs a small
# `mimlab pretrain` with its run folder there, a checkpoint every step. The run must
#  - stop with an error that names a file and says the disk is full (no panic),
#  - leave no `*.tmp` and no piece without its JSON in `checkpoints/`,
#  - leave every complete checkpoint readable: the folder, copied to a disk with room, resumes
#    and ends bit-identical to an uninterrupted run (weights, optimizer state, losses).
#
# Usage: sudo scripts/fault_disk_full.sh [MIMLAB_BINARY]
set -u
cd "$(dirname "$0")/.."
BIN=${1:-}
if [ -z "$BIN" ]; then
  if [ -x target/release/mimlab ]; then BIN=target/release/mimlab; else BIN=target/debug/mimlab; fi
fi
[ -x "$BIN" ] || { echo "no mimlab binary at $BIN (cargo build --release)"; exit 2; }
[ "$(id -u)" = 0 ] || { echo "needs root to mount a tmpfs"; exit 2; }
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
CONFIG=configs/simmim/swinv2_nano_fmnist.yaml
WORK=$(mktemp -d)
MNT=$WORK/mnt
mkdir -p "$MNT"
trap 'umount "$MNT" 2>/dev/null; rm -rf "$WORK"' EXIT
STEPS=6
SMALL=(--set data.max_samples=256 --set train.batch_size=16 --set train.max_steps=$STEPS
       --set run.checkpoint_every_steps=1 --set run.keep_checkpoints=2 --set run.image_every=2
       --set run.log_every=1 --set run.threads=1)
"$BIN" pretrain --config $CONFIG "${SMALL[@]}" --set run.output_dir="$WORK/ref" --set run.name=r \
  >"$WORK/ref.log" 2>&1 || { echo "reference run failed"; tail -3 "$WORK/ref.log"; exit 1; }
REF=$WORK/ref/r/checkpoints

trials=0 clean=0
for kib in 4 16 64 256 1024 2048 3072 4096 6144 8192 9216 10240 12288 14336 16384 20480 24576; do
  trials=$((trials + 1))
  mount -t tmpfs -o size=${kib}k tmpfs "$MNT" || { echo "mount failed"; exit 2; }
  "$BIN" pretrain --config $CONFIG "${SMALL[@]}" --set run.output_dir="$MNT" --set run.name=d \
    >"$WORK/d$kib.out" 2>"$WORK/d$kib.err"
  rc=$?
  err=$(grep -m1 '^error:' "$WORK/d$kib.err")
  bad=""
  if [ $rc = 0 ]; then
    bad="finished although the disk is ${kib} KiB"
  elif grep -q panicked "$WORK/d$kib.err"; then
    bad="panic: $(grep -m1 panicked "$WORK/d$kib.err")"
  elif ! echo "$err" | grep -qi 'no space left'; then
    bad="error does not say the disk is full: $err"
  elif ! echo "$err" | grep -q "$MNT/"; then
    bad="error names no file: $err"
  fi
  ck=$MNT/d/checkpoints
  if [ -z "$bad" ] && [ -d "$ck" ]; then
    if ls -A "$ck" | grep -q '\.tmp'; then bad="leftover temp file: $(ls -A "$ck" | grep tmp)"; fi
    for f in "$ck"/step_*; do
      [ -e "$f" ] || continue
      s=${f##*/step_}; s=${s%%.*}
      [ -e "$ck/step_$s.json" ] || bad="${bad:+$bad; }orphan $f"
    done
  fi
  done_steps=$(ls "$ck" 2>/dev/null | grep -c '\.json$')
  if [ -z "$bad" ] && [ "$done_steps" -gt 0 ]; then
    cp -r "$MNT/d" "$WORK/copy$kib"
    if "$BIN" pretrain --resume "$WORK/copy$kib" >"$WORK/r$kib.log" 2>&1; then
      for f in safetensors optim.safetensors; do
        cmp -s "$WORK/copy$kib/checkpoints/step_$STEPS.$f" "$REF/step_$STEPS.$f" \
          || bad="${bad:+$bad; }resumed step_$STEPS.$f differs"
      done
    else
      bad="resume failed: $(tail -1 "$WORK/r$kib.log")"
    fi
  fi
  umount "$MNT"
  if [ -z "$bad" ]; then
    clean=$((clean + 1))
    echo "${kib} KiB: clean stop after $done_steps checkpoint(s): ${err#error: }"
  else
    echo "${kib} KiB: BROKEN: $bad"
  fi
done
echo "disk-full trials clean / tried: $clean / $trials"
[ "$clean" = "$trials" ]
