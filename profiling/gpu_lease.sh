#!/usr/bin/env bash
# run_cuda.sh on a lent GPU machine with no network and no esskit installed (the device tool's):
# esskit runs from this checkout (PYTHONPATH and a shim for the `esskit` command), wheels carried in
# .whl/ are installed to a scratch folder (the image lacks tomli-w), every part gets what is left of
# DEADLINE_S, and after each part the results are packed into one archive under OUT (few files come
# back, and a call cut short still returns what it measured).
# Usage: OUT=$OUT [DEADLINE_S=540] [PARTS="smoke knn fp32 b8 fp16 bench amp"] profiling/gpu_lease.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:?set OUT to the folder that comes back}
site=/tmp/esskit-site bin=/tmp/esskit-bin results=/tmp/esskit-results
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH} PATH=$bin:$PATH
end=$((${DEADLINE_S:-540} - 10))  # from the script's start (SECONDS = 0), less the last pack's time
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl || exit 1
fi
python3 -c "import tomli_w" 2>/dev/null || echo "no tomli-w: training parts will fail; carry .whl/ (see profiling/README)"
mkdir -p "$bin" "$results" "$out"
printf '#!/bin/sh\nexec python3 -m esskit "$@"\n' >"$bin/esskit" && chmod +x "$bin/esskit"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  >"$results/gpu.txt" 2>&1
for part in ${PARTS:-smoke knn fp32 b8 fp16 bench amp}; do
  left=$((end - SECONDS))
  [ "$left" -gt 15 ] || { echo "deadline: parts from $part on not run"; break; }
  PARTS=$part DEADLINE_S=$left bash profiling/run_cuda.sh "$results"
  rc=$?
  python3 profiling/issue8_targets.py "$results" --out "$results/issue8.md" >/dev/null 2>&1  # the targets so far
  tar czf "$out/results.tgz.tmp" -C "$results" . && mv "$out/results.tgz.tmp" "$out/results.tgz"  # whole or the last one
  [ "$rc" = 3 ] && break  # the smoke cell failed: nothing else would work
done
