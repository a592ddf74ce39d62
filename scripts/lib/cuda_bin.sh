# shellcheck shell=bash
# The CUDA build of scripts/cuda_build.sh on a GPU machine, for scripts/cuda_check.sh and
# scripts/gpu_dense_recipes.sh: `cuda_bin BUILD_DIR` unpacks BUILD_DIR/cuda-bin.tar.xz (the packed
# form) into /tmp/mimlab-cuda-bin when BUILD_DIR holds no `mimlab`, puts on LD_LIBRARY_PATH the
# folders of the CUDA libraries the binary links (cuBLAS, cuRAND, NVRTC of CUDA 13: from a
# toolkit or from PyTorch's cu13 wheels, wherever the machine has them), and sets `build` to the
# folder holding `mimlab` (and `fixtures`).
cuda_bin() {
    build=$(realpath "$1")
    if [[ ! -x $build/mimlab && -f $build/cuda-bin.tar.xz ]]; then
        mkdir -p /tmp/mimlab-cuda-bin
        tar -xJf "$build/cuda-bin.tar.xz" -C /tmp/mimlab-cuda-bin
        build=/tmp/mimlab-cuda-bin
    fi
    local lib dir
    for lib in $(ldd "$build/mimlab" | awk '/not found/ {print $1}'); do
        dir=$(find /usr/local /opt /usr/lib -name "$lib" 2>/dev/null | head -1)
        [[ -n $dir ]] && export LD_LIBRARY_PATH=$(dirname "$dir")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    done
    if ldd "$build/mimlab" | grep "not found"; then
        echo "cuda_bin: libraries missing" >&2
    fi
}
