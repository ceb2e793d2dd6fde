"""Console + TensorBoard logging with megatron's scalar tag names.

TensorBoard is written by one rank only: the last pipeline stage's first TP / DP rank (where the
loss lives). Every scalar is logged against the iteration and, as megatron does, as
"<tag> vs samples" and "<tag> vs tokens". Disabled (no directory) means no writer and no work.
"""
from __future__ import annotations

import math
import sys
import time

import torch.distributed as dist


def is_logging_rank() -> bool:
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def print_rank0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


class MetricsLogger:
    def __init__(self, tensorboard_dir: str | None, *, seq_length: int, log_interval: int):
        self.seq_length = seq_length
        self.log_interval = max(1, log_interval)
        self.writer = None
        self.console = is_logging_rank()
        if tensorboard_dir and self.console:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=tensorboard_dir, max_queue=100)
        self._t0 = time.perf_counter()

    def _scalar(self, tag: str, value, iteration: int, samples: int) -> None:
        if self.writer is None or value is None:
            return
        self.writer.add_scalar(tag, value, iteration)
        self.writer.add_scalar(tag + " vs samples", value, samples)
        self.writer.add_scalar(tag + " vs tokens", value, samples * self.seq_length)

    def step_start(self) -> None:
        self._t0 = time.perf_counter()

    def train_step(self, iteration: int, samples: int, global_batch: int, result) -> None:
        """iteration: 1-based count of completed steps; samples: consumed after this step."""
        dt = time.perf_counter() - self._t0
        if iteration % self.log_interval:
            return
        tokens_per_sec = global_batch * self.seq_length / max(dt, 1e-9)
        for tag, value in (("lm loss", result.loss), ("learning-rate", result.lr), ("grad-norm", result.grad_norm),
                           ("loss-scale", result.loss_scale)):
            self._scalar(tag, value, iteration, samples)
        if self.writer is not None:
            self.writer.add_scalar("iteration-time", dt, iteration)
            self.writer.add_scalar("throughput/tokens_per_sec", tokens_per_sec, iteration)
        if self.console:
            parts = [f"iter {iteration}", f"lm loss {result.loss:.6f}", f"lr {result.lr:.3e}"]
            if result.grad_norm is not None:
                parts.append(f"grad-norm {result.grad_norm:.4f}")
            if result.loss_scale is not None:
                parts.append(f"loss-scale {result.loss_scale:g}")
            if result.skipped:
                parts.append("skipped (overflow)")
            parts.append(f"{dt * 1000:.0f} ms")
            parts.append(f"{tokens_per_sec:.0f} tok/s")
            print(" | ".join(parts), flush=True)

    def validation(self, iteration: int, samples: int, loss: float) -> None:
        ppl = math.exp(min(loss, 20.0))
        self._scalar("lm loss validation", loss, iteration, samples)
        self._scalar("lm loss validation ppl", ppl, iteration, samples)
        if self.console:
            print(f"validation at iter {iteration} | lm loss {loss:.6f} | ppl {ppl:.3f}", flush=True)

    def scalars(self, iteration: int, values: dict) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        sys.stdout.flush()
