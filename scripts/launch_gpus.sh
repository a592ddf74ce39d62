#!/usr/bin/env bash
# Data-parallel training on N GPUs of one machine over NCCL: starts N copies of a mimlab command
# (built with `--features nccl`, e.g. `FEATURES=cuda,nccl bash scripts/cuda_build.sh`), rank r on
# the r-th visible GPU, and waits for them. The config's train.batch_size is the global batch
# (a multiple of N); rank 0 writes the run folder; `RUN/world.jsonl` records N.
#
# Usage: bash scripts/launch_gpus.sh N mimlab pretrain --config C --set run.device=cuda [...]
#   Every rank gets MIMLAB_DIST=nccl, MIMLAB_RANK, MIMLAB_WORLD_SIZE, MIMLAB_NCCL_ID (the file
#   through which rank 0 hands out NCCL's unique id) and CUDA_VISIBLE_DEVICES = its GPU, so its
#   `cuda` device is its own GPU. Output of ranks > 0 is prefixed with `[rank r]`. When a rank
#   fails the others are stopped; the exit status is the first failure's.
# CPU processes (one machine or several) use MPI instead: `mpirun -np N mimlab ...` with a build
# of `--features mpi` (README, "Data parallel").
set -uo pipefail
if [[ $# -lt 2 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
    sed -n '2,/^set/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
fi
n=$1
shift
if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
    IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
else
    mapfile -t gpus < <(seq 0 $((n - 1)))
fi
if ((${#gpus[@]} < n)); then
    echo "launch_gpus.sh: $n ranks but only ${#gpus[@]} GPUs visible (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-})" >&2
    exit 2
fi
id_file=$(mktemp -u "${TMPDIR:-/tmp}/mimlab-nccl-id.XXXXXX")
pids=()
cleanup() { rm -f "$id_file"; }
trap cleanup EXIT
for ((r = 0; r < n; r++)); do
    (
        export MIMLAB_DIST=nccl MIMLAB_RANK=$r MIMLAB_WORLD_SIZE=$n MIMLAB_NCCL_ID=$id_file
        export CUDA_VISIBLE_DEVICES=${gpus[$r]}
        if ((r == 0)); then
            exec "$@"
        else
            exec "$@" > >(sed "s/^/[rank $r] /") 2> >(sed "s/^/[rank $r] /" >&2)
        fi
    ) &
    pids+=($!)
done
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
    wait -n -p done_pid "${running[@]}"
    rc=$?
    next=()
    for p in "${running[@]}"; do [[ $p != "$done_pid" ]] && next+=("$p"); done
    running=("${next[@]}")
    if ((rc != 0 && status == 0)); then
        status=$rc
        echo "launch_gpus.sh: a rank exited with status $rc; stopping the others" >&2
        kill "${running[@]}" 2>/dev/null
    fi
done
exit "$status"
