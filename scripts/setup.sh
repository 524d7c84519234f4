#!/usr/bin/env bash
# Create .venv with Python >= 3.12 and install zv-dask with its dev extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=""
for cand in python3.13 python3.12 python3 python; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; then
    PY="$cand"; break
  fi
done
if [ -z "$PY" ] && command -v pyenv >/dev/null 2>&1; then
  for v in $(pyenv versions --bare | grep -E '^3\.1[2-9]' | sort -V -r); do PY="$(pyenv root)/versions/$v/bin/python"; break; done
fi
[ -n "$PY" ] || { echo "zv-dask needs Python >= 3.12 (none found; pyenv install 3.12)" >&2; exit 1; }
echo "using $PY ($("$PY" --version))"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# An editable install has no bytecode, and with PYTHONDONTWRITEBYTECODE set (as on this project's
# machines) every command would compile the package again: about 0.25 s of each CLI start-up. pip
# compiles what it installs; this does the same for the package (a stale file is recompiled in memory).
.venv/bin/python -m compileall -q zv_dask
.venv/bin/python -c "import zv_dask, zarr_vectors; print('zv-dask', zv_dask.__version__, 'ready')"
