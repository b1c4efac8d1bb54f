#!/usr/bin/env bash
# The README's 30-minute accuracy runs: the `shapes` preset trained for at most 30 minutes of wall time on the
# synthetic set generated with seed 0, then the same recipe on a set generated with seed 1, each run with all
# of the machine's cores (one after the other), then COCO-evaluated on each set's 200 held-out val images.
#
#   bash bench/accuracy_30min.sh [WORKDIR] [SECONDS] [EXTRA --opts ...]   # default /tmp/mrcnn_accuracy, 1800
#
# 64 sampled RoIs per image instead of the preset's 128: late in training the mask and keypoint heads (run on
# every positive) cost more than the backbone; 64 makes an iteration ~1.6x faster, though each learns less.
# PARALLEL=1 runs both seeds at once with one thread each instead (half the compute per run, same wall time).
# Prints each run's AP table; writes WORKDIR/r{0,1}/metrics.json and WORKDIR/summary.txt.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/mrcnn_accuracy}
budget=${2:-1800}
shift $(( $# < 2 ? $# : 2 ))
extra=("$@")
venv="${MRCNN_VENV:-$root/.venv}"
if [ -x "$venv/bin/mrcnn-fast" ]; then cli=("$venv/bin/mrcnn-fast"); else cli=(python -m mrcnn_fast); fi
mkdir -p "$work"
for s in 0 1; do
  [ -f "$work/s$s/val.json" ] || "${cli[@]}" make-shapes "$work/s$s" --train 2000 --val 200 --seed "$s" > /dev/null
done
run() {  # run SEED THREADS
  local d="$work/s$1"
  OMP_NUM_THREADS=$2 MRCNN_NUM_THREADS=$2 "${cli[@]}" train --config shapes \
    --train-json "$d/train.json" --train-images "$d/train" --val-json "$d/val.json" --val-images "$d/val" \
    --output "$work/r$1" --time-budget "$budget" --max-iter 100000 --opts train.num_workers=0 model.roi_heads.batch_size_per_image=64 "${extra[@]}" \
    > "$work/r$1.out" 2> "$work/r$1.log"
}
if [ "${PARALLEL:-0}" = 1 ]; then
  run 0 1 & p0=$!
  run 1 1 & p1=$!
  wait "$p0"; wait "$p1"
else
  threads=$(nproc)
  run 0 "$threads"
  run 1 "$threads"
fi
: > "$work/summary.txt"
for s in 0 1; do
  echo "== data seed $s ($(grep -o 'iter [0-9]*/[0-9]*' "$work/r$s.log" | tail -1))" | tee -a "$work/summary.txt"
  tee -a "$work/summary.txt" < "$work/r$s.out"
done
