#!/usr/bin/env bash
# GPU measurement of the same grid (needs a CUDA GPU with >= 12 GiB; the budget caps the allocator
# so a bigger card behaves like the paper's 12 GB Titan). Optional: pip install nvidia-ml-py for the
# NVML device name and memory.
set -euo pipefail
cd "$(dirname "$0")/.."
for precision in no fp16; do
  name=$([ "$precision" = no ] && echo fp32 || echo "$precision")
  esskit profile --device cuda --backbone resnet50 --crop 512 --budget-gib 12 \
    --classes 19,150,1284,10000 --methods baseline,ess --mixed-precision "$precision" \
    --out "profiling/results/resnet50-512-$name-cuda"
done
