#!/usr/bin/env bash
# Keeps the GPU code from rotting on machines without a GPU: type-checks and lints the
# workspace with the `cuda` feature (candle's CUDA backend + NCCL), with nvcc and the CUDA
# headers from PyPI wheels (see .ci/cuda-env.sh). candle-kernels compiles its CUDA kernels
# even for `cargo check`, so the target dir lives in the cache and is reused across runs.
set -euo pipefail
cd "$(dirname "$0")/.."
export LOCKSTEP_CUDA_LIBS=0   # headers and nvcc suffice for checking; no link-time libraries
# shellcheck source=cuda-env.sh
source .ci/cuda-env.sh
export CARGO_TARGET_DIR="${LOCKSTEP_CUDA_TARGET:-${LOCKSTEP_CUDA_HOME:-$HOME/.cache/lockstep-cuda}/target}"
started=$SECONDS
cargo clippy --all-targets -p lockstep-common -p lockstep-coordinator -p lockstep-worker \
  --features lockstep-coordinator/cuda,lockstep-worker/cuda -- -D warnings
echo "cuda-check: clippy with --features cuda passed in $((SECONDS - started))s"
