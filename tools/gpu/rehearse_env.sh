#!/usr/bin/env bash
# Builds, here on a CPU machine, a stand-in for the GPU machine's Python: a Python 3.12 virtual
# environment outside the repository holding what that image has (torch 2.11, triton 3.6,
# transformers 5.17 and the few other packages our code imports that the image already has) and
# NOTHING of ours: megatron-core, DeepSpeed, compressed-tensors, pydantic and hjson must come from
# the offline bundle (tools/gpu/bundle.sh), exactly as on the GPU machine.
#   bash tools/gpu/rehearse_env.sh [VENV_DIR]     (default /work/gpu-rehearsal-venv; needs PyPI)
# torch 2.11 from PyPI is a CUDA build (nvidia-* wheels, several GB); it imports without a GPU.
set -euo pipefail
VENV="${1:-${GPU_REHEARSAL_VENV:-/work/gpu-rehearsal-venv}}"
PY312="${PY312:-/root/.pyenv/versions/3.12.1/bin/python3.12}"
[[ -x "$PY312" ]] || PY312="$(command -v python3.12 || true)"
if [[ -z "$PY312" ]] || ! "$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  echo "rehearse_env.sh: no Python 3.12 interpreter at '$PY312' (set PY312=/path/to/python3.12)" >&2
  exit 2
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY312" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# numpy < 2.4 (the image has 2.5): triton 3.6's INTERPRETER calls int() on a one-element array for a
# data-dependent loop bound (`range(0, hi_n, BLOCK_N)` in our kernels), which numpy >= 2.4 refuses
# ("only 0-dimensional arrays can be converted"); triton 3.9 fixed it. Only the CPU rehearsal runs the
# interpreter: the GPU machine compiles the kernels, so its numpy 2.5 is not affected.
# The GPU image's versions (/work/.library/device/KINDS.md: torch 2.11.0+cu130, triton 3.6.0,
# transformers 5.17.0, numpy 2.x) and the packages of that image that our code or the checks use.
"$VENV/bin/python" -m pip install -q \
  "torch==2.11.*" "triton==3.6.*" "transformers==5.17.*" \
  sentencepiece tensorboard safetensors "numpy<2.4" matplotlib \
  pytest pyyaml tqdm psutil packaging einops msgpack ninja py-cpuinfo tokenizers
# typer (a transformers dependency) pulls pydantic from PyPI today; the GPU image has no pydantic
# (KINDS.md's package list, field notes sec. 5), so remove it: the bundle must bring it.
"$VENV/bin/python" -m pip uninstall -q -y pydantic pydantic-core annotated-types typing-inspection hjson loguru \
  2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import sys, torch, triton, transformers
print(f"rehearsal venv: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"triton {triton.__version__}, transformers {transformers.__version__}")
for absent in ("megatron", "deepspeed", "compressed_tensors", "pydantic", "hjson"):
    try:
        __import__(absent)
    except ImportError:
        continue
    sys.exit(f"rehearse_env.sh: {absent} is installed in the venv; the GPU image lacks it")
PY
