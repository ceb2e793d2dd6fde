"""Console + TensorBoard logging with megatron's scalar tag names.

TensorBoard is written by one rank only: the last pipeline stage's first TP / DP rank (where the
loss lives). Every scalar is logged against the iteration and, as megatron does, as
"<tag> vs samples" and "<tag> vs tokens". Disabled (no directory) means no writer and no work.

One writer per step axis: ``tensorboard_dir`` (iterations), ``tensorboard_dir/vs_samples`` and
``tensorboard_dir/vs_tokens``. A (re)start writes TensorBoard's restart marker into each
(SummaryWriter ``purge_step``: a SessionLog START at that step; TensorBoard then drops every earlier
event of the same run with step >= it), at the first step this run will log on that axis: the events
a crashed run wrote past its last complete checkpoint disappear from every tag, and a fresh run in a
reused directory starts clean. Each axis needs its own run directory since the purge applies to all
tags of a run at one step value.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch.distributed as dist


def is_logging_rank() -> bool:
    from megatron.core import parallel_state as ps

    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0


def print_rank0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# step axis -> (tag suffix, sub-directory of tensorboard_dir)
AXES = {"iteration": ("", ""), "samples": (" vs samples", "vs_samples"), "tokens": (" vs tokens", "vs_tokens")}


class MetricsLogger:
    def __init__(
        self,
        tensorboard_dir: str | None,
        *,
        seq_length: int,
        log_interval: int,
        start_iteration: int = 0,
        start_samples: int = 0,
    ):
        """start_iteration / start_samples: where this run starts (the resumed checkpoint's iteration
        and consumed samples; 0 for a new run). Events past them on any axis are purged."""
        self.seq_length = seq_length
        self.log_interval = max(1, log_interval)
        self.writers = {}
        self.console = is_logging_rank()
        if tensorboard_dir and self.console:
            from torch.utils.tensorboard import SummaryWriter

            start = {"iteration": start_iteration, "samples": start_samples, "tokens": start_samples * seq_length}
            self.writers = {
                axis: SummaryWriter(
                    log_dir=os.path.join(tensorboard_dir, sub), max_queue=100, purge_step=start[axis] + 1
                )
                for axis, (_, sub) in AXES.items()
            }
        self._t0 = time.perf_counter()

    def _scalar(self, tag: str, value, iteration: int, samples: int) -> None:
        if not self.writers or value is None:
            return
        steps = {"iteration": iteration, "samples": samples, "tokens": samples * self.seq_length}
        for axis, (suffix, _) in AXES.items():
            self.writers[axis].add_scalar(tag + suffix, value, steps[axis])

    def step_start(self) -> None:
        self._t0 = time.perf_counter()

    def train_step(self, iteration: int, samples: int, global_batch: int, result) -> None:
        """iteration: 1-based count of completed steps; samples: consumed after this step."""
        dt = time.perf_counter() - self._t0
        if iteration % self.log_interval:
            return
        tokens_per_sec = global_batch * self.seq_length / max(dt, 1e-9)
        for tag, value in (
            ("lm loss", result.loss),
            ("learning-rate", result.lr),
            ("grad-norm", result.grad_norm),
            ("loss-scale", result.loss_scale),
        ):
            self._scalar(tag, value, iteration, samples)
        self.scalars(iteration, {"iteration-time": dt, "throughput/tokens_per_sec": tokens_per_sec})
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
        """Scalars against the iteration only."""
        if not self.writers:
            return
        for tag, value in values.items():
            self.writers["iteration"].add_scalar(tag, value, iteration)
        if any(tag.startswith("outliers/") for tag in values):  # a probe (rare): on disk at once, so a
            self.writers["iteration"].flush()  # run stopped from outside keeps its probes

    def flush(self) -> None:
        """Everything logged so far onto disk (called before each checkpoint save)."""
        for w in self.writers.values():
            w.flush()

    def close(self) -> None:
        for w in self.writers.values():
            w.flush()
            w.close()
        self.writers = {}
        sys.stdout.flush()
