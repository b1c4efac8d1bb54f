#!/usr/bin/env bash
# The README's main command: sets up .venv, builds the extension, runs `mrcnn-fast demo`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup_env.sh
venv="${MRCNN_VENV:-$root/.venv}"
exec "$venv/bin/mrcnn-fast" demo "$@"
