#!/usr/bin/env bash
# Developer build: compiles the extension into python/mrcnn_fast/ so `PYTHONPATH=python` picks it up.
# Usage: scripts/build_inplace.sh [extra cmake args, e.g. -DMRCNN_CUDA=OFF]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python}
bdir=${MRCNN_BUILD_DIR:-$root/build-dev}
cmake -S "$root" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$py")" \
  -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" \
  -DMRCNN_OUTPUT_DIR="$root/python/mrcnn_fast" "$@" >/dev/null
cmake --build "$bdir" -j"${MRCNN_BUILD_JOBS:-2}"
