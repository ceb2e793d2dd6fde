#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment on a fresh machine.
#   bash launch/setup_env.sh            -> ./.venv   (override with OUTEFF_VENV=/path)
# Idempotent: it re-installs only when pyproject.toml changed since the last successful run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OUTEFF_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

stamp="$VENV/.outeff-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

echo "[setup_env] creating $VENV" >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel
# 1) torch first, pinned: the CPU wheel on CI/dev machines (a CUDA machine gets its default build).
pip install -q "torch==2.13.0"
# 2) deepspeed imports torch in setup.py: build it against the torch above, with no JIT ops prebuilt.
DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed==0.19.8"
# 3) the package itself with test + Hugging Face extras.
pip install -q -e "$ROOT[test]"
echo "$want" > "$stamp"
echo "[setup_env] ready: $VENV" >&2
