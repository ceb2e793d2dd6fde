"""Pretrain an OPT-style causal LM with megatron-core models and DeepSpeed ZeRO.

    python -m megatron_outeff.training.train --config configs/train/demo-tiny.yaml [--set a.b=c ...] [--resume]
    torchrun --nproc_per_node 2 -m megatron_outeff.training.train --config ...
    deepspeed --hostfile launch/hostfile.example megatron_outeff/training/train.py --config ...

The loop, top to bottom: stop-signal handler -> config (every key validated at load) -> process
groups -> checkpoint-dir ownership and what to resume (decided, nothing written) -> model ->
DeepSpeed engine -> data -> resume (one call) -> run.json -> [fetch micro-batches, forward/backward,
check, step, log, validate, save]* -> end.
SIGTERM / SIGUSR1: finish the current step, save, exit 0; before the first step: exit 0 without
writing. A run with a checkpoint directory that already holds this run's checkpoints resumes
automatically. A non-finite loss or gradient norm stops the run before its optimizer step (one
``error:`` line, exit code 3): ``latest`` stays the last checkpoint, whose weights are finite.
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

import numpy as np
import torch
import torch.distributed as dist

from megatron_outeff.errors import one_line
from megatron_outeff.utils.cli import OneLineArgumentParser, command, error_line, input_text_file

from . import checkpoint
from .config import Config, deepspeed_config, load_config


def parse_args(argv=None):
    parser = OneLineArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--config", required=True, type=input_text_file, help="training YAML (configs/train/*.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.train_iters=100 (repeatable)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the checkpoint in checkpoint.dir even if its config differs"
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # deepspeed launcher
    return parser.parse_args(argv)


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag; the loop saves and stops after the current step, and a stop asked
    for before the first step ends the run without writing anything. Installed first thing (before the
    config loads, the model builds and the checkpoint loads), since SLURM's scancel and torchrun send
    SIGTERM at any moment. Ranks agree (an all-reduce) so all of them take part in the final save."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = False
        self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def close(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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


def train(cfg: Config, force_resume: bool = False, model_hook=None, stop: StopRequest | None = None) -> dict:
    """Run (or resume) the training described by cfg. model_hook(model), if given, sees this rank's
    freshly built megatron model before DeepSpeed wraps it (e.g. to load initial weights). ``stop``: the
    signal handler main() installed first (else one is installed here).
    Returns {"iteration", "history": [(iteration, loss), ...]}. Raises TrainingDiverged (nothing
    saved past the last finite checkpoint) and OutEffError (bad input, nothing written)."""
    from megatron.core import parallel_state as ps

    from megatron_outeff.megatron.parallel import init_distributed, init_model_parallel

    from .engine import build_trainer
    from .launch_checks import check_launch_world, check_ranks_agree
    from .metrics_logger import MetricsLogger, print_rank0
    from .step import SkippedSteps, TrainingDiverged, eval_loss, train_step

    if stop is None:  # called as a library: this call owns the handler
        with StopRequest() as stop:
            return train(cfg, force_resume, model_hook, stop)

    # 1. Process groups, seeds, and every check that can fail before anything is written; the
    #    checkpoint directory: may this run use it, and which checkpoint does it resume.
    deepspeed_config(cfg, check_launch_world(cfg))  # the world init_distributed will make vs the layout; overrides
    init_distributed()
    check_ranks_agree(cfg)  # node agents launched with different configs: one error, before any group
    init_model_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, cfg.train.seed)
    set_seeds(cfg.train.seed)
    world = dist.get_world_size()
    num_micro = cfg.grad_accumulation_steps(world)
    ckpt = checkpoint.Checkpointer(cfg, force_resume)
    print_rank0(
        f"world {world} = TP {cfg.parallel.tensor_parallel} x PP {cfg.parallel.pipeline_parallel} x "
        f"DP {ps.get_data_parallel_world_size()}; ZeRO-{cfg.parallel.zero_stage}; {cfg.precision.dtype}; "
        f"{num_micro} micro-batches of {cfg.parallel.micro_batch_size} per DP rank; fingerprint {cfg.fingerprint()}"
    )
    if stopped_before_start(stop):
        return {"iteration": 0, "history": []}

    # 2. This rank's model (TP shard / PP stage) with its initial weights, the DeepSpeed engine, and
    #    this DP rank's slice of each global batch; then resume in one call (weights, optimizer,
    #    data position, RNG).
    def prepare_model(model):
        if model_hook is not None:
            model_hook(model)
        ckpt.init_weights(model)  # checkpoint.init_from, for a new run

    trainer, train_data, valid_data = build_trainer(cfg, prepare_model=prepare_model, model_cfg=ckpt.model_config)
    engine = trainer.engine
    iteration = ckpt.load(engine, train_data)
    if stopped_before_start(stop):
        return {"iteration": iteration, "history": []}
    ckpt.record_run()  # run.json only now: everything that can refuse this config has run

    logger = MetricsLogger(
        cfg.logging.tensorboard_dir,
        seq_length=cfg.data.seq_length,
        log_interval=cfg.logging.log_interval,
        start_iteration=iteration,
        start_samples=train_data.consumed_samples,
    )
    outliers = None
    if cfg.logging.outlier_interval > 0 and valid_data is not None:
        from .outliers import OutlierMonitor

        outliers = OutlierMonitor(engine.module, cfg.logging.outlier_interval)
    skipped = SkippedSteps.of(cfg)  # DeepSpeed skipped the update: non-finite gradients
    history = []  # (iteration, loss) on this rank, for tests and the final summary

    # 3. The loop.
    stopping = False
    while not stopping and iteration < cfg.train.train_iters:
        logger.step_start()
        micro_batches = train_data.next_global_batch()
        try:
            result = train_step(trainer, micro_batches)  # checks loss and grad norm before the update
            skipped.update(result)
        except TrainingDiverged as e:  # nothing of this step is saved; say where the work is
            raise TrainingDiverged(
                f"iteration {iteration + 1}: {e}; training stopped before its optimizer "
                f"step. {ckpt.describe_last()}. {NEXT_STEP}"
            ) from None
        iteration += 1
        history.append((iteration, result.loss))
        logger.train_step(iteration, train_data.consumed_samples, cfg.parallel.global_batch_size, result)

        if valid_data is not None and cfg.train.eval_interval and iteration % cfg.train.eval_interval == 0:
            valid_data.load_state_dict({"consumed_samples": 0})
            batches = [b for _ in range(cfg.train.eval_iters) for b in valid_data.next_global_batch()]
            logger.validation(iteration, train_data.consumed_samples, eval_loss(trainer, batches))  # per token of all

        if outliers is not None and outliers.due(iteration):
            probe = valid_data.first_microbatch()  # the same batch every time
            logger.scalars(
                iteration,
                outliers.measure(
                    lambda probe=probe: eval_loss(trainer, [probe]), **probe_position_masks(cfg, probe["tokens"])
                ),
            )

        stopping = iteration >= cfg.train.train_iters or (
            bool(cfg.train.exit_interval) and iteration % cfg.train.exit_interval == 0
        )
        if stop.any_rank():
            print_rank0(f"stop requested: saving at iteration {iteration} and exiting")
            stopping = True
        if ckpt.save_due(iteration, stopping):
            logger.flush()  # the events up to a checkpoint are on disk with it
            try:
                ckpt.save(engine, iteration, train_data)
            except TrainingDiverged as e:  # non-finite weights are never saved
                raise TrainingDiverged(f"{e}. {ckpt.describe_last()}. {NEXT_STEP}") from None

    # 4. End.
    logger.close()
    print_rank0(f"done at iteration {iteration}" + (" (stopped early)" if iteration < cfg.train.train_iters else ""))
    return {"iteration": iteration, "history": history}


# What the user does after divergence (the same command would diverge again: resume is exact).
NEXT_STEP = (
    "To go on, change what diverged (e.g. lower optimizer.lr, raise schedule.warmup_iters, set "
    "train.clip_grad) and rerun with --resume, which continues from that checkpoint"
)


def stopped_before_start(stop: StopRequest) -> bool:
    """Collective: a stop asked for before the first step (SIGTERM at start-up) ends the run here,
    before anything is written."""
    from .metrics_logger import print_rank0

    if not stop.any_rank():
        return False
    print_rank0("stop requested before the first step: exiting without writing anything")
    return True


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
    from .step import DIVERGED_EXIT_CODE, TrainingDiverged

    # first: a SIGTERM while the config loads, the model builds or a checkpoint loads is a stop, not a kill
    with StopRequest() as stop:
        try:
            args = parse_args(argv)
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
            train(load_config(args.config, args.set), force_resume=args.resume, stop=stop)
        except TrainingDiverged as e:  # every rank stops at the same step: one line, from rank 0
            error_line(one_line(e))
            return DIVERGED_EXIT_CODE
        finally:
            if dist.is_initialized():  # megatron's groups, the process groups, their gloo threads: before exit
                from megatron_outeff.megatron.parallel import shutdown_distributed

                shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
