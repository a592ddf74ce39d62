#!/usr/bin/env bash
# Builds mimlab with `--features cuda` on a machine without a CUDA install (no GPU needed): the
# CUDA 13.0 compiler, headers and libraries come from NVIDIA's PyPI wheels into .cuda-toolkit/
# (~1.2 GiB, once), plus a stub libcuda.so to link against (the real one is the GPU machine's
# driver). Where CUDA is installed (nvcc on PATH), plain `cargo build --release --features cuda`
# is all it takes.
#
# Usage: [FEATURES=cuda,nccl] bash scripts/cuda_build.sh [OUT_DIR]     (default: target/cuda-bin)
#   FEATURES: the cargo features (default `cuda`); `nccl` adds data-parallel training over NCCL
#   (scripts/launch_gpus.sh) and links libnccl.so.2 (from the nvidia-nccl-cu13 wheel here; the GPU
#   machine needs one too, e.g. PyTorch's).
#   CUDA_COMPUTE_CAP=90 (the default: Hopper, H100/H200) sets the GPU generation candle's kernels
#   are compiled for; 80 = A100, 89 = L4/RTX 40xx. The driver on the GPU machine must support
#   CUDA 13.0 (driver 580 or newer); the GPU machine needs libcublas.so.13, libcublasLt.so.13,
#   libcurand.so.10 and libnvrtc.so.13 (a CUDA 13 toolkit, or PyTorch's cu13 wheels' libraries on
#   LD_LIBRARY_PATH).
# Writes OUT_DIR/mimlab and OUT_DIR/fixtures (the test binary of models/tests/fixtures.rs, for
# `MIMLAB_TEST_DEVICE=cuda`), stripped, and both packed in OUT_DIR/cuda-bin.tar.xz (~14 MB
# instead of ~125 MB, to send to a GPU machine); scripts/cuda_check.sh runs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-target/cuda-bin}")
features=${FEATURES:-cuda}
tk=$PWD/.cuda-toolkit
root=$tk/nvidia/cu13
if ! command -v nvcc >/dev/null; then
    if [[ ! -x $root/bin/nvcc || ! -e $root/lib/stubs/libcuda.so ]]; then
        echo "installing the CUDA 13.0 toolchain from PyPI into $tk (once)" >&2
        mkdir -p "$tk/wheels"
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 -d "$tk/wheels" \
            "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
            "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
            "nvidia-cublas==13.0.*" "nvidia-curand<10.4.1"
        for w in "$tk"/wheels/*.whl; do unzip -q -o "$w" -d "$tk"; done
        # linker names for the versioned libraries
        for f in "$root"/lib/*.so.*; do ln -sf "$(basename "$f")" "${f%%.so.*}.so"; done
        # A stub of the driver library with every entry point cuda.h declares (cudarc links
        # -lcuda); the GPU machine's libcuda.so.1 replaces it at run time.
        mkdir -p "$root/lib/stubs"
        gcc -E -I"$root/include" "$root/include/cuda.h" | grep -oP '\bcu[A-Z]\w*(?=\s*\()' |
            sort -u | sed 's/.*/void &(void) {}/' >"$tk/libcuda_stub.c"
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$tk/libcuda_stub.c"
    fi
    export CUDA_ROOT=$root CUDA_PATH=$root PATH=$root/bin:$PATH
    export LIBRARY_PATH=$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
    if [[ $features == *nccl* ]]; then
        if [[ ! -e $tk/nvidia/nccl/lib/libnccl.so ]]; then
            python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 \
                --platform manylinux_2_18_x86_64 --platform manylinux_2_17_x86_64 \
                --platform manylinux2014_x86_64 -d "$tk/wheels" "nvidia-nccl-cu13"
            unzip -q -o "$tk"/wheels/nvidia_nccl_cu13-*.whl -d "$tk"
            ln -sf libnccl.so.2 "$tk/nvidia/nccl/lib/libnccl.so"
        fi
        export LIBRARY_PATH=$tk/nvidia/nccl/lib:$LIBRARY_PATH
    fi
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# Its own target folder: the CUDA build changes candle's features, which would rebuild the
# CPU build's dependencies on every switch.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
cargo build --release --features "$features"
# the whole workspace's features (as the build above), so nothing of it is rebuilt
cargo test --release --features "$features" --workspace --test fixtures --no-run
mkdir -p "$out"
strip -o "$out/mimlab" "$CARGO_TARGET_DIR/release/mimlab"
fixtures=$(ls -t "$CARGO_TARGET_DIR"/release/deps/fixtures-* | grep -v '\.d$' | head -1)
strip -o "$out/fixtures" "$fixtures"
tar -cf - -C "$out" mimlab fixtures | xz -T0 -9 >"$out/cuda-bin.tar.xz"
ls -la "$out"
