#!/usr/bin/env bash
# Create .venv from a Python >= 3.12 interpreter if it is missing (or stale), then install the project into it.
# Idempotent: a venv whose stamp matches pyproject.toml is reused as is (no network, no pip).
# PYTHON=/path/to/python3.12 picks the interpreter explicitly.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
STAMP="$VENV/.qwenvl-mcore-stamp"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi

is_py312plus() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local c v
  if [ -n "${PYTHON:-}" ]; then
    is_py312plus "$PYTHON" && { echo "$PYTHON"; return 0; }
    echo "error: PYTHON=$PYTHON is not a Python >= 3.12" >&2; return 1
  fi
  # pyenv first, preferring 3.12 (the version megatron-core 0.19 and the GPU images are tested with).
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9](\.[0-9]+)?$' | sort -V); do
      c="$(pyenv root)/versions/$v/bin/python3"
      is_py312plus "$c" && { echo "$c"; return 0; }
    done
  fi
  for c in python3.12 python3.13 python3.14 python3; do
    command -v "$c" >/dev/null 2>&1 && is_py312plus "$c" && { command -v "$c"; return 0; }
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  if ! PY=$(find_python); then
    echo "error: qwenvl-mcore needs Python >= 3.12 (megatron-core 0.19 ships no wheels for older Pythons)." >&2
    echo "       None was found on PATH or in pyenv. Install one (e.g. 'pyenv install 3.12' or 'apt-get install python3.12')," >&2
    echo "       or point PYTHON at it: PYTHON=/path/to/python3.12 make test" >&2
    exit 1
  fi
  echo "[setup] creating $VENV with $PY ($("$PY" --version))"
  "$PY" -m venv "$VENV"
fi
log="$VENV/pip-install.log"
echo "[setup] installing dependencies into $VENV (first time: about 6 GB and a few minutes; log: $log)"
if ! { "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel && "$VENV/bin/python" -m pip install -q -e .; } >"$log" 2>&1; then
  grep -v -e "is ignored: it is neither a file nor a directory" "$log" | tail -n 40 >&2
  echo "error: installing the dependencies failed (full log: $log)" >&2
  exit 1
fi
echo "$want" > "$STAMP"
echo "[setup] ready: $VENV ($("$VENV/bin/python" --version))"
