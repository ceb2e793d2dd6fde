#!/usr/bin/env bash
# Multi-node (or single-node) training with torchrun. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 GPUS_PER_NODE=8 \
#       bash launch/train_torchrun.sh configs/train/opt-125m-paper.yaml [--set a.b=c ...] [--resume]
# Defaults: one node, all local GPUs (or 1 process on a CPU-only machine), 127.0.0.1:29500.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${1:?usage: train_torchrun.sh CONFIG.yaml [--set key=value ...] [--resume]}"
shift

if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE="$(nvidia-smi -L 2>/dev/null | wc -l || true)"
    [[ "$GPUS_PER_NODE" -ge 1 ]] 2>/dev/null || GPUS_PER_NODE=1
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-${OUTEFF_VENV:-$ROOT/.venv}/bin/python}"

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.cache/torch_extensions}"
export PYTHONUNBUFFERED=1
cd "$ROOT"
echo "[train_torchrun] node $NODE_RANK/$NNODES, $GPUS_PER_NODE procs/node, master $MASTER_ADDR:$MASTER_PORT" >&2
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m megatron_outeff.training.train --config "$CONFIG" "$@"
