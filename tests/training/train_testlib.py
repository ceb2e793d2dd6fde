"""Shared settings of the training tests: a tiny deterministic run (fp32, no clipping, no dropout)."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
DEMO = str(ROOT / "configs/train/demo-tiny.yaml")

# The oracle settings: every layout must reproduce this loss curve.
BASE = [
    "train.train_iters=4", "train.clip_grad=0", "train.eval_interval=0", "checkpoint.dir=null",
    "logging.tensorboard_dir=null", "logging.log_interval=1", "precision.dtype=fp32",
    "model.arch_overrides={vocab_size: 256, hidden_dropout: 0.0, attention_dropout: 0.0}",
    "parallel.micro_batch_size=1", "parallel.global_batch_size=4", "schedule.warmup_iters=1",
    "parallel.zero_stage=0",
]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache/torch_extensions"))
    e["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboard_scalars(tb_dir) -> dict:
    """{tag: [(step, value), ...]} over every run directory MetricsLogger writes (the iteration axis in
    tb_dir, the samples / tokens axes in its vs_samples / vs_tokens), read by TensorBoard's own
    EventAccumulator, which applies restart purges as the TensorBoard UI does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for sub in ("", "vs_samples", "vs_tokens"):
        if not (Path(tb_dir) / sub).is_dir():
            continue  # the callers assert on the tags they expect
        acc = EventAccumulator(str(Path(tb_dir) / sub))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            assert tag not in out, f"{tag} written on two step axes"
            out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    return out
