"""Pretrain an OPT-style causal LM with megatron-core models and DeepSpeed ZeRO.

    python -m megatron_outeff.training.train --config configs/train/demo-tiny.yaml [--set a.b=c ...] [--resume]
    torchrun --nproc_per_node 2 -m megatron_outeff.training.train --config ...
    deepspeed --hostfile launch/hostfile.example megatron_outeff/training/train.py --config ...

The loop, top to bottom: config (every key validated at load) -> process groups -> checkpoint-dir
ownership (decided, nothing written) -> model -> DeepSpeed engine -> data -> resume -> run.json ->
[fetch micro-batches, forward/backward/step, log, validate, save]* -> end.
SIGTERM / SIGUSR1: finish the current step, save, exit 0. A run with a checkpoint directory that
already holds this run's checkpoints resumes from `latest` automatically.
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # Run as a file (the deepspeed launcher does this): run the installed package's module instead,
    # whose relative imports need the package.
    from megatron_outeff.training.train import main

    sys.exit(main())

import argparse
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_outeff.utils.cli import OneLineArgumentParser, command, input_text_file

from . import checkpoint, elastic
from .config import Config, deepspeed_config, load_config
from .data import order_change_note


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--config", required=True, type=input_text_file, help="training YAML (configs/train/*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.train_iters=100 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the checkpoint in checkpoint.dir even if its config differs")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return parser.parse_args(argv)


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the loop saves and stops after the current step. Ranks agree
    (an all-reduce) so all of them take part in the final save."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = False
        self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self.received = True

    def any_rank(self) -> bool:
        from .model import device

        flag = torch.tensor([1.0 if self.received else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: Config, force_resume: bool = False, model_hook=None) -> dict:
    """Run (or resume) the training described by cfg. model_hook(model), if given, sees this rank's
    freshly built megatron model before DeepSpeed wraps it (e.g. to load initial weights).
    Returns {"iteration", "history": [(iteration, loss), ...]}."""
    from megatron.core import parallel_state as ps

    from megatron_outeff.megatron.parallel import init_distributed, init_model_parallel

    from .engine import build_trainer
    from .launch_checks import check_launch_world, check_ranks_agree
    from .metrics_logger import MetricsLogger, print_rank0
    from .step import eval_loss, train_step

    # 1. Process groups, seeds, and every check that can fail before anything is written.
    deepspeed_config(cfg, check_launch_world(cfg))  # the world init_distributed will make vs the layout; overrides
    init_distributed()
    check_ranks_agree(cfg)  # node agents launched with different configs: one error, before any group
    init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.train.seed)
    set_seeds(cfg.train.seed)
    world = dist.get_world_size()
    num_micro = cfg.grad_accumulation_steps(world)
    resume = checkpoint.claim_run_dir(cfg, force_resume)
    print_rank0(f"world {world} = TP {cfg.parallel.tensor_parallel} x PP {cfg.parallel.pipeline_parallel} x "
                f"DP {ps.get_data_parallel_world_size()}; ZeRO-{cfg.parallel.zero_stage}; {cfg.precision.dtype}; "
                f"{num_micro} micro-batches of {cfg.parallel.micro_batch_size} per DP rank; fingerprint {cfg.fingerprint()}")

    # 2. This rank's model (TP shard / PP stage) with its initial weights, the DeepSpeed engine, and
    #    this DP rank's slice of each global batch.
    def prepare_model(model):
        if model_hook is not None:
            model_hook(model)
        if cfg.checkpoint.init_from and not resume:  # a resumed run has its own weights
            checkpoint.init_from(cfg, model)

    model_cfg = cfg
    if resume:  # at another tensor-parallel size: the checkpoint's vocabulary rows, not this TP's padding
        model_cfg = elastic.model_config(cfg, Path(cfg.checkpoint.dir) / checkpoint.read_latest(cfg.checkpoint.dir))
    trainer, train_data, valid_data = build_trainer(cfg, prepare_model=prepare_model, model_cfg=model_cfg)
    engine = trainer.engine

    # 3. Resume: model/optimizer/scheduler/loss scale from DeepSpeed, data position, then RNG last.
    iteration = 0
    if resume:
        state = checkpoint.load(engine, cfg)
        iteration = state["iteration"]
        train_data.load_state_dict(state["data"])
        if order_change_note(state["data"], train_data):  # another seed, sequence length, data: said, not silent
            print_rank0(order_change_note(state["data"], train_data))
        if state.get("elastic"):  # saved at another layout: its RNG streams belong to other ranks
            elastic.reseed(cfg.train.seed, iteration)
            print_rank0(f"resumed from {cfg.checkpoint.dir}/{state['tag']} at iteration {iteration}, saved at "
                        f"{elastic.describe(state['layout'])}, now {elastic.describe(elastic.layout(cfg, world))}")
        else:
            checkpoint.restore_rng(cfg, state["tag"])
            print_rank0(f"resumed from {cfg.checkpoint.dir}/{state['tag']} at iteration {iteration}")
    last_saved = iteration if resume else None
    checkpoint.record_run(cfg)  # run.json only now: everything that can refuse this config has run

    logger = MetricsLogger(cfg.logging.tensorboard_dir, seq_length=cfg.data.seq_length,
                           log_interval=cfg.logging.log_interval, start_iteration=iteration,
                           start_samples=train_data.consumed_samples)
    outliers = None
    if cfg.logging.outlier_interval > 0 and valid_data is not None:
        from .outliers import OutlierMonitor

        outliers = OutlierMonitor(engine.module, cfg.logging.outlier_interval)
    stop = StopRequest()
    history = []  # (iteration, loss) on this rank, for tests and the final summary

    def save_now():
        nonlocal last_saved
        if cfg.checkpoint.dir and last_saved != iteration:
            logger.flush()  # the events up to a checkpoint are on disk with it
            tag = checkpoint.save(engine, cfg, iteration, {"data": train_data.state_dict()})
            print_rank0(f"saved {cfg.checkpoint.dir}/{tag}")
            last_saved = iteration

    # 4. The loop.
    stopped_early = False
    while iteration < cfg.train.train_iters:
        logger.step_start()
        micro_batches = train_data.next_global_batch()
        result = train_step(trainer, micro_batches)
        iteration += 1
        history.append((iteration, result.loss))
        logger.train_step(iteration, train_data.consumed_samples, cfg.parallel.global_batch_size, result)

        if valid_data is not None and cfg.train.eval_interval and iteration % cfg.train.eval_interval == 0:
            valid_data.load_state_dict({"consumed_samples": 0})
            batches = [b for _ in range(cfg.train.eval_iters) for b in valid_data.next_global_batch()]
            logger.validation(iteration, train_data.consumed_samples, eval_loss(trainer, batches))  # per token of all

        if outliers is not None and outliers.due(iteration):
            probe = valid_data.first_microbatch()  # the same batch every time
            logger.scalars(iteration, outliers.measure(lambda: eval_loss(trainer, [probe]),
                                                       **probe_position_masks(cfg, probe["tokens"])))

        exit_now = bool(cfg.train.exit_interval) and iteration % cfg.train.exit_interval == 0
        if stop.any_rank():
            print_rank0(f"stop requested: saving at iteration {iteration} and exiting")
            exit_now = True
        if cfg.checkpoint.save_interval and iteration % cfg.checkpoint.save_interval == 0 or exit_now:
            save_now()
        if exit_now:
            stopped_early = iteration < cfg.train.train_iters
            break

    # 5. End: final checkpoint.
    save_now()
    logger.close()
    stop.close()
    print_rank0(f"done at iteration {iteration}" + (" (stopped early)" if stopped_early else ""))
    return {"iteration": iteration, "history": history}


def probe_position_masks(cfg: Config, tokens: torch.Tensor) -> dict:
    """The outlier probe's task-specific position classes: for data.source=bigram_backcopy, the loss
    split into copy / bigram positions and the idle query rows (non-trigger positions); else none."""
    if cfg.data.source != "bigram_backcopy":
        return {}
    from .config import bigram_backcopy_task

    task = bigram_backcopy_task(cfg)
    copy = task.copy_positions(tokens)
    return {"position_masks": {"copy": copy, "bigram": ~copy}, "idle": task.idle_positions(tokens)}


@command  # bad input: one `error:` line (rank 0 only: every rank fails alike), exit 2
def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    try:
        train(load_config(args.config, args.set), force_resume=args.resume)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
