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
# One torch.compile cache per forced CPU capability: inductor's on-disk cache is not keyed on
# ATEN_CPU_CAPABILITY, and a CPU kernel compiled natively (avx512) and reused under avx2 returned garbage
# (megatron-core compiles its output gate: 1e34 out of inputs of ~2, torch 2.13; CI's second pass).
if [[ -n "${ATEN_CPU_CAPABILITY:-}" ]]; then
    export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/torchinductor_$(id -un)}-$ATEN_CPU_CAPABILITY"
fi
exec "$VENV/bin/python" -m pytest "$@"
