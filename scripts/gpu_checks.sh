#!/usr/bin/env bash
# The prepared GPU run of this project (one device call): the caches' wall-clock check at 4,096
# tokens, then the shipped adapters of the embedded model trained with `accel train` on CUDA.
#   bash scripts/gpu_checks.sh            (on a CUDA machine; results go to $OUT, default runs/gpu)
# Env: PYTHON (interpreter), DEVICE (cuda), RECIPES, TRAIN_OVERRIDES, SKIP_CACHES.
# Missing Python packages travel as wheels in .whl/ (installed into /tmp/site when absent).
set -o pipefail
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! $PY -c "import diffusers, omegaconf" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=20
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo cpu) | tee "$OUT/device.txt"
if [ -z "${SKIP_CACHES:-}" ]; then
  timeout 150 $PY scripts/bench_caches_gpu.py --double 4 --single 8 --repeats 2 --json "$OUT/caches-gpu.json" 2>&1 \
    | grep -v "Cache-DiT" | tee "$OUT/caches-gpu.log"
fi
declare -A LIMIT=([step-distill-4]=300 [step-distill-4-cfg-reuse]=300 [router]=80 [step-distill-8]=260 [cache-aware]=130)
for recipe in ${RECIPES:-step-distill-4 step-distill-4-cfg-reuse router step-distill-8 cache-aware}; do
  start=$(date +%s)
  timeout "${LIMIT[$recipe]:-120}" $PY -m accel train "train/$recipe" objective.params.device=${DEVICE:-cuda} \
    ${TRAIN_OVERRIDES:-} > "$OUT/log-$recipe.txt" 2>&1
  echo "$recipe: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/train.txt"
  tail -2 "$OUT/log-$recipe.txt"
  tar czf "$OUT/adapters.tgz" runs/train/*/export runs/train/*/loss.csv runs/train/*/loss.png \
    runs/train/*/recipe.yaml "$OUT"/log-*.txt 2>/dev/null
done
rm -f "$OUT"/log-*.txt
