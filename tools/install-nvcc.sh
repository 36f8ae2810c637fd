#!/usr/bin/env bash
# Install the pinned CUDA 13.0 compiler (nvcc, ptxas, headers) from PyPI wheels into ./.cuda.
# No GPU or driver needed. Every package is pinned: nvcc's own dependencies are unpinned and would
# pull a newer nvvm whose PTX the 13.0 ptxas and the GPU machines' 580 driver reject.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .cuda/nvidia/cu13/bin/nvcc ] && .cuda/nvidia/cu13/bin/nvcc --version | grep -q "V13.0.88"; then
  echo "nvcc 13.0.88 already in .cuda"
  exit 0
fi
python3 -m pip install -q --disable-pip-version-check --no-warn-script-location --target .cuda \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
.cuda/nvidia/cu13/bin/nvcc --version | tail -2
echo "export NVCC=$PWD/.cuda/nvidia/cu13/bin/nvcc"
