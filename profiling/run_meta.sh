#!/usr/bin/env bash
# The committed CPU estimates (profiling/results/resnet50-512-{fp32,fp16}-meta): ResNet50, 512x512,
# 12 GiB budget, C = 19 ... 100,000, baseline, ESS (Eq. 6) and ess_full (exact softmax). Minutes on
# a laptop CPU, no GPU needed.
set -euo pipefail
cd "$(dirname "$0")/.."
for precision in no fp16; do
  name=$([ "$precision" = no ] && echo fp32 || echo "$precision")
  /usr/bin/time -f "resnet50-512-$name-meta: %e s wall" \
    esskit profile --device meta --backbone resnet50 --crop 512 --budget-gib 12 \
      --classes 19,150,1284,10000,100000 --methods baseline,ess,ess_full --mixed-precision "$precision" \
      --out "profiling/results/resnet50-512-$name-meta"
done
# Scale (issue 8): ESS and ess_full at C = 19, 10k, 100k, the exact command of the README.
/usr/bin/time -f "resnet50-512-fp32-meta-scale: %e s wall" \
  esskit profile --device meta --classes 19,10000,100000 --methods ess,ess_full \
    --out profiling/results/resnet50-512-fp32-meta-scale
# Table 6 at the paper's own Table 1 settings: Cityscapes 400x800 with d=7, k=6 (C=19), COCO+LVIS
# 450x450 with d=12, k=8 (C=1284); ADE20k's 512x512 (C=150) is in the grid above (k=8 there, Table 1: 7).
/usr/bin/time -f "resnet50-400x800-fp32-meta: %e s wall" \
  esskit profile --device meta --backbone resnet50 --crop 400x800 --classes 19 \
    --set model.embed_dim=7 --set method.k=6 --out profiling/results/resnet50-400x800-fp32-meta
/usr/bin/time -f "resnet50-450-fp32-meta: %e s wall" \
  esskit profile --device meta --backbone resnet50 --crop 450 --classes 1284 --out profiling/results/resnet50-450-fp32-meta
# Embedding dimension d (Figure 4's axis) at C = 1284: what a larger d costs in max batch
# (d = 12 is the grid above).
for d in 7 16 32 64; do
  /usr/bin/time -f "resnet50-512-fp32-meta-d$d: %e s wall" \
    esskit profile --device meta --classes 1284 --methods ess,ess_full --set model.embed_dim=$d \
      --out "profiling/results/resnet50-512-fp32-meta-d$d"
done
