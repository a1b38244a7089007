# shellcheck shell=bash
# .ci/cuda-env.sh — provide what `cargo check/build --features cuda` needs on a
# machine with no GPU and no system CUDA, from PyPI wheels, cached between runs.
#
# Usage (source it; do not execute it):
#     source .ci/cuda-env.sh            # installs on first use, then instant
#     cargo check --workspace --features cuda
#     cargo build --release --features cuda
#
# Knobs (all optional, set before sourcing):
#   LOCKSTEP_CUDA_HOME      cache dir (default: $HOME/.cache/lockstep-cuda)
#   LOCKSTEP_CUDA_LIBS=0    skip the link-time libraries (cuBLAS, cuRAND, NVRTC,
#                           NCCL: ~1.2 GB); enough for `cargo check`, not `build`
#   CUDA_COMPUTE_CAP        GPU arch the kernels are built for (default 90 = H100/H200)
#
# What is installed (CUDA 13.0.2 — what PyTorch 2.11 cu130 pins, and what the
# lent H100/H200 image (driver 580 = CUDA 13.0) carries; keep them in step):
#   cuda-toolkit[nvcc,crt,cccl,cudart,nvvm] == 13.0.2  -> nvcc, ptxas, cicc, headers
#   + [nvrtc,cublas,curand] and nvidia-nccl-cu13 == 2.28.9 (link-time libs)
#   + a generated libcuda.so stub (the driver is not on PyPI; the real
#     libcuda.so.1 comes from the NVIDIA driver at run time).
#
# Why each variable:
#   PATH                  nvcc is found via PATH by cudaforge (candle-kernels' build)
#                         and `nvcc --version` gives cudarc its CUDA version
#   CUDARC_CUDA_VERSION   pins cudarc's bindings to 13.0 explicitly (13000)
#   CUDA_COMPUTE_CAP      no nvidia-smi needed to pick the kernel arch
#   CUDA_HOME/CUDA_PATH/CUDA_ROOT  cudarc's link search (`$root/lib`, `$root/lib/stubs`)
#   LIBRARY_PATH          extra link search for -lcudart (candle-kernels) and -lnccl
#   CUDAFORGE_THREADS     parallel nvcc jobs in candle-kernels' build
# Nothing here sets LD_LIBRARY_PATH: binaries built with it are run on a CUDA
# machine with the driver's libcuda.so.1 and the CUDA 13 libraries on its path.

_lockstep_cuda_env() {
    local home="${LOCKSTEP_CUDA_HOME:-$HOME/.cache/lockstep-cuda}"
    local want_libs="${LOCKSTEP_CUDA_LIBS:-1}"
    local ctk_version="13.0.2" nccl_version="2.28.9"
    local extras="nvcc,crt,cccl,cudart,nvvm"
    local pkgs=()
    [ "$want_libs" = 1 ] && extras="$extras,nvrtc,cublas,curand"
    pkgs=("cuda-toolkit[$extras]==$ctk_version")
    [ "$want_libs" = 1 ] && pkgs+=("nvidia-nccl-cu13==$nccl_version")

    local stamp="$home/.installed-$ctk_version-$nccl_version-libs$want_libs"
    local site="$home/site"
    local root="$site/nvidia/cu13"
    local py="${PYTHON:-python3}"

    if [ ! -f "$stamp" ] && [ "$want_libs" = 0 ] && ls "$home"/.installed-"$ctk_version"-"$nccl_version"-libs1 >/dev/null 2>&1; then
        stamp="$home/.installed-$ctk_version-$nccl_version-libs1"   # a full install serves check too
    fi
    if [ ! -f "$stamp" ]; then
        echo "cuda-env: installing CUDA $ctk_version wheels into $home ..." >&2
        local t0=$SECONDS
        rm -rf "$site" "$home"/.installed-* && mkdir -p "$home" || return 1
        PIP_ROOT_USER_ACTION=ignore "$py" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
            --no-compile --target "$site" "${pkgs[@]}" >&2 || {
            echo "cuda-env: pip install failed" >&2; return 1; }
        [ -x "$root/bin/nvcc" ] || { echo "cuda-env: no nvcc in $root/bin" >&2; return 1; }

        # The wheels ship only versioned sonames; the linker wants libX.so.
        local f base
        for f in "$root"/lib/lib*.so.* "$site"/nvidia/nccl/lib/libnccl.so.*; do
            [ -e "$f" ] || continue
            base="${f%%.so.*}.so"
            [ -e "$base" ] || ln -s "$(basename "$f")" "$base"
        done
        [ -e "$root/lib/libnccl.so" ] || [ ! -e "$site/nvidia/nccl/lib/libnccl.so" ] \
            || ln -s ../../nccl/lib/libnccl.so "$root/lib/libnccl.so"
        [ -e "$root/include/nccl.h" ] || [ ! -e "$site/nvidia/nccl/include/nccl.h" ] \
            || ln -s ../../nccl/include/nccl.h "$root/include/nccl.h"

        if [ "$want_libs" = 1 ]; then
            # libcuda.so is the driver, not in any wheel: build a link-time stub
            # (soname libcuda.so.1) exporting every cu* entry point cuda.h
            # declares, in both its versioned (_v2, ...) and plain spellings.
            mkdir -p "$root/lib/stubs" || return 1
            {
                cc -E -P -I"$root/include" -x c "$root/include/cuda.h"
                cc -E -P -I"$root/include" -D__CUDA_API_VERSION_INTERNAL -x c "$root/include/cuda.h"
            } 2>/dev/null | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' (' \
              | sort -u | sed 's/.*/void &(void) {}/' >"$root/lib/stubs/cuda_stub.c"
            [ -s "$root/lib/stubs/cuda_stub.c" ] || { echo "cuda-env: no symbols for libcuda stub" >&2; return 1; }
            cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" \
                "$root/lib/stubs/cuda_stub.c" || return 1
        fi
        touch "$stamp"
        echo "cuda-env: installed in $((SECONDS - t0)) s ($(du -sh "$home" | cut -f1))" >&2
    fi

    export LOCKSTEP_CUDA_ROOT="$root"
    export CUDA_HOME="$root" CUDA_PATH="$root" CUDA_ROOT="$root"
    export CUDARC_CUDA_VERSION=13000
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
    export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc 2>/dev/null || echo 2)}"
    case ":$PATH:" in *":$root/bin:"*) ;; *) export PATH="$root/bin:$PATH" ;; esac
    case ":${LIBRARY_PATH:-}:" in
        *":$root/lib:"*) ;;
        *) export LIBRARY_PATH="$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}" ;;
    esac
}

_lockstep_cuda_env || { unset -f _lockstep_cuda_env; return 1 2>/dev/null || exit 1; }
unset -f _lockstep_cuda_env
