#!/usr/bin/env bash
# Short synthetic runs with each kNN option (exact per label pixel, per stride-4 feature pixel,
# per 2x2 and 4x4 block), then the fraction of pixels whose negatives change and the mIoU of each
# (profiling/results/knn_sharing-synthetic). CPU, 30-40 minutes on 2 shared cores.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-150}
# The synthetic recipe's optimiser and d as they were when results/knn_sharing-synthetic was made.
SETS="--set train.steps=$STEPS --set train.log_every=10 --set data.synthetic_val_size=32 --set train.cpu=true
      --set optim.lr=0.01 --set optim.backbone_lr_mult=0.1 --set optim.warmup_steps=0 --set model.embed_dim=7"
export OMP_NUM_THREADS=1
for option in "label:method.knn_at=label" "feature:method.knn_at=feature" "block2:method.knn_block=2" \
              "block4:method.knn_block=4"; do
  name=${option%%:*}
  rm -rf "runs/knn/$name"
  esskit train recipes/synthetic.toml $SETS --set "${option#*:}" --out "runs/knn/$name"
done
python profiling/knn_sharing.py --runs runs/knn/label runs/knn/feature runs/knn/block2 runs/knn/block4 \
  --out profiling/results/knn_sharing-synthetic
