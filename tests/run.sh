#!/usr/bin/env bash
# The test command (README, CI): sets up ./.venv on a fresh machine, then runs the suite.
#   bash tests/run.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash launch/setup_env.sh
VENV="${OUTEFF_VENV:-$ROOT/.venv}"
# DeepSpeed JIT-builds small CPU ops (shm, ~30 s cold): keep them in one place across runs.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export PYTHONUNBUFFERED=1
exec "$VENV/bin/python" -m pytest "$@"
