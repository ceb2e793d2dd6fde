"""Build the DeepSpeed engine around this rank's megatron-core model (with checkpoint.py,
optimizer.py and elastic.py, the only modules that import DeepSpeed).

- ``build_trainer``: the builder train.py, tools/bench_train.py and the tests share: model ->
  initial weights -> engine -> data sources.
- ``build_engine``: model -> ``deepspeed.initialize`` with our client optimizer and LR schedule
  (optimizer.py) and megatron's process groups (``MegatronMPU``).
- ``MegatronMPU``: megatron's parallel_state under the names DeepSpeed calls, so DeepSpeed reduces
  gradients over the data-parallel group only (never across TP shards) and sums grad norms over the
  model-parallel group (TP x PP), counting TP-duplicated parameters once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_outeff.errors import OutEffError

from .config import Config, deepspeed_config
from .optimizer import build_optimizer, build_scheduler, clips_itself


class MegatronMPU:
    """The ``mpu`` object DeepSpeed expects, backed by megatron-core's parallel_state."""

    # DeepSpeed's names that parallel_state has with the same meaning
    SAME_NAMES = (
        "get_tensor_model_parallel_rank",
        "get_tensor_model_parallel_world_size",
        "get_tensor_model_parallel_group",
        "get_tensor_model_parallel_src_rank",
        "get_pipeline_model_parallel_world_size",
        "get_pipeline_model_parallel_rank",
        "get_pipeline_model_parallel_group",
        "get_model_parallel_group",
        "get_model_parallel_src_rank",
        "get_data_parallel_group",
        "get_data_parallel_world_size",
        "get_data_parallel_rank",
    )

    def __init__(self):
        from megatron.core import parallel_state

        for name in self.SAME_NAMES:
            setattr(self, name, getattr(parallel_state, name))

    # model parallel = TP x PP: grad-norm reduction and checkpoint file naming (mp_rank_XX)
    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(self.get_model_parallel_group())

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(self.get_model_parallel_group())

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.get_data_parallel_group())


def _allreduce_sequence_parallel_grads(model: torch.nn.Module) -> int:
    """Under sequence parallelism each TP rank holds a partial gradient of the parameters marked
    ``sequence_parallel`` (LayerNorms, row-parallel biases): a gradient hook sums them over the TP
    group before DeepSpeed sees them (DeepSpeed's own hooks run after accumulation, so ZeRO-2/3's
    in-backward reduction sees the summed gradient too). Returns the number of hooked parameters."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()

    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    n = 0
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.requires_grad:
            p.register_hook(hook)
            n += 1
    return n


@dataclass
class Trainer:
    """What a step needs: the DeepSpeed engine and a few facts about this rank."""

    engine: object
    cfg: Config
    num_microbatches: int
    is_last_stage: bool
    pipelined: bool = False
    own_clipping: bool = False  # optimizer.clips_itself: we reduce over DP and clip, DeepSpeed only updates

    @property
    def lr(self) -> float:
        return self.engine.lr_scheduler.get_lr()


def build_engine(cfg: Config, model: torch.nn.Module) -> Trainer:
    """``deepspeed.initialize`` around this rank's model. Raises OutEffError for precisions DeepSpeed
    cannot run here (fp16 on CPU; fp16 with pipeline parallelism)."""
    import deepspeed
    from megatron.core import parallel_state

    world = dist.get_world_size()
    if cfg.precision.dtype == "fp16" and not torch.cuda.is_available():
        raise OutEffError("precision.dtype=fp16: DeepSpeed supports fp16 only on CUDA devices; use bf16 or fp32 on CPU")
    pipelined = cfg.parallel.pipeline_parallel > 1
    if pipelined and cfg.precision.dtype == "fp16":
        # the schedule would need DeepSpeed's loss scale as grad_scale_func: not wired yet
        raise OutEffError("parallel.pipeline_parallel > 1 supports precision.dtype fp32 or bf16, not fp16 (yet)")
    if cfg.parallel.sequence_parallel:
        _allreduce_sequence_parallel_grads(model)
    optimizer = build_optimizer(cfg, model)
    ds_config = deepspeed_config(cfg, world)
    own_clipping = clips_itself(cfg)
    if own_clipping:
        ds_config["gradient_clipping"] = 0.0
    if pipelined:
        # megatron's pipeline schedule runs all micro-batches' forward/backward itself; DeepSpeed then
        # reduces over DP and steps once: every engine.step() is the accumulation boundary.
        ds_config["managed_gradient_accumulation"] = False
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=build_scheduler(cfg, optimizer),
        config=ds_config,
        mpu=MegatronMPU(),
        dist_init_required=False,
    )
    if pipelined and own_clipping:
        engine.enable_backward_allreduce = False  # we average over DP before clipping (step.pipeline_train_step)
    return Trainer(
        engine=engine,
        cfg=cfg,
        num_microbatches=cfg.grad_accumulation_steps(world),
        is_last_stage=parallel_state.is_pipeline_last_stage(),
        pipelined=pipelined,
        own_clipping=own_clipping,
    )


def build_trainer(
    cfg: Config,
    *,
    prepare_model: Optional[Callable[[torch.nn.Module], None]] = None,
    model_cfg: Optional[Config] = None,
):
    """(trainer, training batches, validation batches or None) of this rank; process groups must exist
    (megatron.parallel.init_model_parallel). ``prepare_model(model)`` sees the freshly built model
    before DeepSpeed wraps it (initial weights: checkpoint.init_from, a test's). ``model_cfg`` (default
    ``cfg``) builds the model where it differs (a resume on another layout keeps the checkpoint's
    vocabulary rows: training/elastic.py ``model_config``)."""
    from megatron.core import parallel_state as ps

    from .data import build_sources
    from .model import arch_config, build_model

    model = build_model(model_cfg or cfg)  # this rank's TP shard / PP stage
    if prepare_model is not None:
        prepare_model(model)
    trainer = build_engine(cfg, model)
    train_data, valid_data = build_sources(
        cfg,
        vocab_size=arch_config(cfg).vocab_size,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
    )
    return trainer, train_data, valid_data
