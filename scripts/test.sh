#!/usr/bin/env bash
# The README's test command: sets up .venv, builds the extension, lints (ruff), runs the whole test suite.
# Extra arguments go to pytest, e.g. the quick selection for daily work: bash scripts/test.sh -m "not slow"
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup_env.sh
venv="${MRCNN_VENV:-$root/.venv}"
echo "[test] ruff check python tests bench"
"$venv/bin/python" -m ruff check python tests bench
set +e
# Run from tests/ so `import mrcnn_fast` resolves to the installed build, not the source folder.
(cd tests && "$venv/bin/python" -m pytest -q -p no:cacheprovider --timeout=1200 "$@")
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "ERROR: pytest collected no tests" >&2
  exit 1
fi
exit $rc
