#!/usr/bin/env bash
# The CUDA checks of issue 23, on a machine with an NVIDIA GPU, python3 with torch + timm +
# torchvision, and a mimlab built with `--features cuda` (scripts/cuda_build.sh makes BUILD_DIR:
# the `mimlab` binary and `fixtures`, the test binary of models/tests/fixtures.rs).
# Not part of CI: CI has no GPU. Needs data/fashion-mnist (scripts/setup-data.sh) for `runs`.
#
# Usage: bash scripts/cuda_check.sh BUILD_DIR OUT_DIR [parity] [runs] [nccl] [bench]
#   (default: parity runs bench; nccl needs a build with FEATURES=cuda,nccl)
#   parity  the timm/official fixture tests with the model on the GPU (MIMLAB_TEST_DEVICE=cuda)
#   runs    the README's first-run SimMIM config on the GPU (400 steps), the same config for 50
#           steps on the CPU (the per-step losses of both are compared: same init, data and
#           masks, only the arithmetic differs), then the 1%-label finetuning from the GPU run
#   nccl    data parallel over NCCL (scripts/launch_gpus.sh): 30 SimMIM steps as a 1-rank NCCL
#           group against the plain CUDA run (the gradients go through ncclAllReduce: the losses
#           must be bit-identical), and with 2 or more GPUs, 2 ranks against it (within 1e-6)
#   bf16    run.precision bf16 (linear and attention products in bfloat16, f32 weights): the
#           first-run SimMIM config against f32 on the GPU (final losses within 2%), and the
#           tiny_w8 and block bench rows at f32 and bf16 in both tools (PyTorch: torch.autocast)
#   bench   `mimlab bench --device cuda` and `scripts/bench_pytorch.py --device cuda`, side by side
# Run folders go to $RUNS (default OUT_DIR/runs); BENCH_ARGS are the flags both benches get
# (default `--warmup 2 --iters 10`). Each check writes OUT_DIR/<check>.log; a failing check does not stop the others; the exit
# status is the number of failed checks.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/cuda_bin.sh
source scripts/lib/cuda_bin.sh
cuda_bin "$1" # sets `build` (unpacking the packed form of cuda_build.sh) and LD_LIBRARY_PATH
out=$(realpath -m "$2")
shift 2
checks=("$@")
[[ ${#checks[@]} -eq 0 ]] && checks=(parity runs bench)
mkdir -p "$out"
bin="$build/mimlab"
runs=${RUNS:-$out/runs}
bench_args=${BENCH_ARGS:---warmup 2 --iters 10}
failed=0

step() { # name command...: runs it with its output in OUT/name.log and on stdout
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [[ $rc -eq 0 ]] || failed=$((failed + 1))
    return "$rc"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

for check in "${checks[@]}"; do
    case "$check" in
    parity)
        MIMLAB_TEST_DEVICE=cuda step parity "$build/fixtures" --test-threads 1 --nocapture
        ;;
    runs)
        pre=(pretrain --config configs/simmim/swinv2_nano_fmnist.yaml
            --set run.output_dir="$runs" --set run.log_every=1)
        step simmim_cuda "$bin" "${pre[@]}" --set run.device=cuda --set run.name=simmim-cuda
        step simmim_cpu "$bin" "${pre[@]}" --set run.device=cpu --set run.name=simmim-cpu \
            --set train.max_steps=50 --set run.threads=8
        step simmim_compare python3 - "$runs/simmim-cuda" "$runs/simmim-cpu" <<'PY'
import sys
sys.path.insert(0, "scripts/lib")
from run_table import train_losses
gpu, cpu = (train_losses(r) for r in sys.argv[1:])
steps = sorted(set(gpu) & set(cpu))
assert len(steps) >= 50, f"only {len(steps)} common steps"
d = [abs(gpu[s] - cpu[s]) / abs(cpu[s]) for s in steps]
for s in (steps[0], steps[9], steps[-1]):
    print(f"step {s}: loss cuda {gpu[s]:.6f} cpu {cpu[s]:.6f}")
last = max(gpu)
print(f"{len(steps)} steps compared: max relative loss difference {max(d):.2e} "
      f"(first 10 steps {max(d[:10]):.2e}); cuda run: {last} steps, final loss "
      f"{gpu[last]:.4f}")
assert max(d[:10]) < 1e-3, "CUDA and CPU losses differ in the first 10 steps"
PY
        step finetune_cuda "$bin" finetune --config configs/finetune/swinv2_nano_fmnist_1pct.yaml \
            --init "$runs/simmim-cuda" --set run.device=cuda --set run.output_dir="$runs" \
            --set run.name=finetune-cuda
        ;;
    bf16)
        pre=(pretrain --config configs/simmim/swinv2_nano_fmnist.yaml --set run.device=cuda
            --set run.output_dir="$runs" --set run.log_every=1)
        step simmim_f32 "$bin" "${pre[@]}" --set run.name=simmim-f32
        step simmim_bf16 "$bin" "${pre[@]}" --set run.name=simmim-bf16 --set run.precision=bf16
        step bf16_compare python3 - "$runs/simmim-f32" "$runs/simmim-bf16" <<'PY'
import sys
sys.path.insert(0, "scripts/lib")
from run_table import train_losses
f, b = (train_losses(r) for r in sys.argv[1:])
last = max(f)
tail = lambda l: sum(l[s] for s in range(last - 49, last + 1)) / 50
d = abs(tail(b) - tail(f)) / tail(f)
print(f"f32: loss {f[1]:.4f} -> {f[last]:.4f}; bf16: {b[1]:.4f} -> {b[last]:.4f}; mean of the "
      f"last 50 steps f32 {tail(f):.4f} bf16 {tail(b):.4f} ({d:.2%} apart)")
sys.exit(0 if d <= 0.02 else "bf16: the loss curve is more than 2% off f32's")
PY
        for p in f32 bf16; do
            # shellcheck disable=SC2086
            step bench_mimlab_$p "$bin" bench --device cuda --precision $p --threads 2 $bench_args \
                --filter swinv2_tiny --filter block/ --json "$out/mimlab_cuda_$p.json"
            # shellcheck disable=SC2086
            step bench_pytorch_$p python3 scripts/bench_pytorch.py --device cuda --precision $p \
                --threads 2 $bench_args --filter swinv2_tiny --filter block/ \
                --json "$out/pytorch_cuda_$p.json"
            step bench_table_$p python3 scripts/bench_table.py "$out/mimlab_cuda_$p.json" \
                "$out/pytorch_cuda_$p.json"
        done
        ;;
    nccl)
        pre=(pretrain --config configs/simmim/swinv2_nano_fmnist.yaml --set run.device=cuda
            --set run.output_dir="$runs" --set run.log_every=1 --set train.max_steps=30)
        step cuda_plain "$bin" "${pre[@]}" --set run.name=cuda-plain
        step nccl_1 bash scripts/launch_gpus.sh 1 "$bin" "${pre[@]}" --set run.name=nccl-1
        gpus=$(nvidia-smi -L | wc -l)
        compare=("$runs/nccl-1")
        if ((gpus >= 2)); then
            step nccl_2 bash scripts/launch_gpus.sh 2 "$bin" "${pre[@]}" --set run.name=nccl-2
            compare+=("$runs/nccl-2")
        fi
        step nccl_compare python3 - "$runs/cuda-plain" "${compare[@]}" <<'PY'
import json, sys
sys.path.insert(0, "scripts/lib")
from run_table import train_losses as losses
plain = losses(sys.argv[1])
ok = True
for run in sys.argv[2:]:
    l = losses(run)
    world = [json.loads(x) for x in open(f"{run}/world.jsonl")]
    d = max(abs(l[s] - plain[s]) / abs(plain[s]) for s in plain)
    print(f"{run}: {len(l)} steps, loss {l[1]:.6f} -> {l[max(l)]:.6f}; max relative difference "
          f"from the plain CUDA run {d:.2e}; world.jsonl {world}")
    ok &= sorted(l) == sorted(plain) and d <= (0.0 if world[0]["world_size"] == 1 else 1e-6)
sys.exit(0 if ok else "nccl: the data-parallel losses differ from the plain run's")
PY
        ;;
    bench)
        # shellcheck disable=SC2086
        step bench_mimlab "$bin" bench --device cuda --threads 2 $bench_args \
            --json "$out/mimlab_cuda.json"
        # shellcheck disable=SC2086
        step bench_pytorch python3 scripts/bench_pytorch.py --device cuda --threads 2 $bench_args \
            --json "$out/pytorch_cuda.json"
        step bench_table python3 scripts/bench_table.py "$out/mimlab_cuda.json" \
            "$out/pytorch_cuda.json"
        ;;
    *)
        echo "cuda_check.sh: unknown check '$check' (parity, runs, bf16, nccl, bench)" >&2
        exit 2
        ;;
    esac
done
echo "cuda_check.sh: $failed failed check(s); logs in $out"
exit "$failed"
