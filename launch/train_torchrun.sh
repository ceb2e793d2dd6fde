#!/usr/bin/env bash
# Multi-node (or single-node) training with torchrun. Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 GPUS_PER_NODE=8 \
#       bash launch/train_torchrun.sh configs/train/opt-125m-paper.yaml [--set a.b=c ...] [--resume]
# Defaults: one node, all local GPUs (or 1 process on a CPU-only machine), 127.0.0.1:29500.
# Several nodes meet in a c10d rendezvous at MASTER_ADDR:MASTER_PORT (the agent on that machine hosts
# it; RDZV_ID names the job, default outeff-$MASTER_PORT); ranks are assigned there, NODE_RANK is only
# a label. Every agent must get the same config: the trainers compare theirs first and stop with one
# error line naming the first differing key (exit 2 in each trainer, torchrun reports the failure).
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
if [[ "$NNODES" == 1 ]]; then
    RDZV=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
    RDZV=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-outeff-$MASTER_PORT}")
fi
echo "[train_torchrun] node $NODE_RANK/$NNODES, $GPUS_PER_NODE procs/node, master $MASTER_ADDR:$MASTER_PORT" >&2
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" "${RDZV[@]}" \
    -m megatron_outeff.training.train --config "$CONFIG" "$@"
