#!/usr/bin/env bash
# Creates .venv (once) with torch, torchvision (the parity reference) and the test tools, then builds and
# installs mrcnn_fast into it. Idempotent: re-running only rebuilds what changed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
venv="${MRCNN_VENV:-$root/.venv}"
stamp="$venv/.mrcnn_deps_v2"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
if [ ! -f "$stamp" ]; then
  # torch 2.14.1 + torchvision with their CUDA libraries take ~5.6 GB in the venv (peak ~7.3 GB during the
  # install and build, measured on a fresh clone): say so up front instead of failing half-way with ENOSPC.
  need_gb=${MRCNN_SETUP_MIN_FREE_GB:-8}
  for d in "$venv" "${TMPDIR:-/tmp}"; do
    free_kb=$(df -Pk "$d" | awk 'NR == 2 {print $4}')
    if [ -n "$free_kb" ] && [ "$free_kb" -lt $(( need_gb * 1024 * 1024 )) ]; then
      echo "[setup] ERROR: only $(( free_kb / 1024 )) MiB free on the file system of $d; installing torch 2.14.1 +" \
        "torchvision 0.29.1 needs about ${need_gb} GiB there (set MRCNN_SETUP_MIN_FREE_GB to change the check)" >&2
      exit 1
    fi
  done
  echo "[setup] installing dependencies into $venv (torch 2.14.1 + torchvision 0.29.1, several GB; once)"
  "$py" -m pip install -q --upgrade pip
  # --no-cache-dir: no second copy of the wheels in pip's cache (halves the peak disk use of a fresh set-up)
  "$py" -m pip install -q --no-cache-dir "torch==2.14.1" "torchvision==0.29.1"
  "$py" -m pip install -q numpy pycocotools pillow safetensors pyyaml tqdm \
    pytest pytest-benchmark pytest-timeout ruff "scikit-build-core>=0.9" "pybind11>=2.12" ninja "cmake>=3.24"
  touch "$stamp"
fi
echo "[setup] building mrcnn_fast (CUDA kernels compile when nvcc is found)"
# Compiler warnings fail the build (-Wall -Wextra -Werror), for the demo and the tests alike: one set of flags
# means one build, so running one command after the other rebuilds nothing. MRCNN_WERROR=0 turns it off (e.g. an
# untested compiler). Passed either way, so that the CMake cache does not keep an earlier value.
werror=ON
if [ "${MRCNN_WERROR:-1}" = "0" ]; then werror=OFF; fi
"$py" -m pip install -q --no-build-isolation --no-deps -Cbuild-dir="$root/build/pip" \
  -Ccmake.define.MRCNN_WERROR="$werror" "$root"
"$py" -c "import mrcnn_fast; from mrcnn_fast import _lib; print('[setup] mrcnn_fast', mrcnn_fast.__version__, '| CUDA kernels compiled:', _lib.cuda_compiled(), '| CUDA device:', mrcnn_fast.has_cuda())"
