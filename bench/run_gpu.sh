#!/usr/bin/env bash
# One command for a machine with a CUDA GPU and a plain python with torch (+ torchvision, pytest,
# pytest-benchmark, pybind11, cmake) already installed, no venv: builds the extension in place with the
# CUDA kernels, runs every CUDA test, then the benchmarks on the GPU. Logs and result tables go to
# bench/results/ (gpu_tests.log, gpu_bench.log, gpu_results.md).
# Usage: bench/run_gpu.sh [extra pytest args for the benchmarks, e.g. -k roi_pool]
# Env: PYTHON (default python3), CUDA_ARCH (default 90), MRCNN_BUILD_DIR (default build-gpu).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
results=$root/bench/results

# Build: the same configuration as scripts/build_inplace.sh, but CUDA required and Ninja only if present.
gen=()
command -v ninja >/dev/null 2>&1 && gen=(-G Ninja)
bdir=${MRCNN_BUILD_DIR:-$root/build-gpu}
cmake -S "$root" -B "$bdir" ${gen[@]+"${gen[@]}"} -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v "$py")" -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" \
  -DMRCNN_OUTPUT_DIR="$root/python/mrcnn_fast" -DMRCNN_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" || exit 1
cmake --build "$bdir" -j"$(nproc)" || exit 1

export PYTHONPATH=$root/python${PYTHONPATH:+:$PYTHONPATH}
"$py" -c "import mrcnn_fast, sys; sys.exit(0 if mrcnn_fast.has_cuda() else 'mrcnn_fast sees no CUDA device')" || exit 1
mkdir -p "$results"

# Every CUDA test: -m "" clears any marker filter, -k cuda picks the CUDA-parametrised and CUDA-only tests.
(cd tests && "$py" -m pytest -q -p no:cacheprovider -m "" -k cuda -rs) 2>&1 | tee "$results/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# Benchmarks on the GPU; bench/conftest.py appends the median table to bench/results/gpu_results.md.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
export MRCNN_BENCH_DEVICE="cuda: ${gpu:-unknown GPU}"
(cd bench && "$py" -m pytest -q -s "$@") 2>&1 | tee "$results/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}

echo "tests exit code: $tests_rc, benchmarks exit code: $bench_rc (logs in $results)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
