#!/usr/bin/env bash
# Every GPU measurement of profiling/README.md in one script (needs a CUDA GPU with >= 12 GiB):
#   1. max batch / peak / times at a 12 GiB cap (the paper's Titan), fp32 and fp16: Figure 1, Tables 6-7;
#   2. equal batch 8 (R50 512^2), baseline / ESS / ess_full from C = 19 to 100,000: time per image
#      ratios, kNN share of the step, peak memory (cap raised so the baseline's logits fit where they can);
#   3. the loss-step benchmark on the GPU.
# Usage: profiling/run_cuda.sh [RESULTS_DIR]   (default profiling/results). Each part is time-boxed so a
# short GPU lease still brings back the parts that finished. Optional: nvidia-ml-py for the NVML name.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-profiling/results}
limit=${PART_TIMEOUT_S:-240}
status=0
run() { timeout "$limit" "$@" || { echo "FAILED or timed out ($?): $*"; status=1; }; }

for precision in no fp16; do
  name=$([ "$precision" = no ] && echo fp32 || echo "$precision")
  run esskit profile --device cuda --backbone resnet50 --crop 512 --budget-gib 12 \
    --classes 19,150,1284,10000 --methods baseline,ess,ess_full --mixed-precision "$precision" \
    --max-batch 64 --out "$results/resnet50-512-$name-cuda"
done
run esskit profile --device cuda --backbone resnet50 --crop 512 --budget-gib 70 --batch 8 \
  --classes 19,150,1284,10000,100000 --methods baseline,ess,ess_full --out "$results/resnet50-512-fp32-b8-cuda"
run python profiling/bench_loss.py --device cuda --batch 8 --size 512 --loss-chunk-mib 64 --knn-chunk-mib 64 \
  --reps 5 --budget-s 20 --max-mib 60000 --out "$results/bench_loss-cuda"
exit $status
