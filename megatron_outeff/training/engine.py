"""DeepSpeed around a megatron-core model: the only module (with checkpoint.py) that imports DeepSpeed.

- ``MegatronMPU``: megatron's parallel_state under the names DeepSpeed calls, so DeepSpeed reduces
  gradients over the data-parallel group only (never across TP shards) and sums grad norms over the
  model-parallel group (TP x PP), counting TP-duplicated parameters once.
- ``param_groups``: AdamW groups; biases never decayed, LayerNorm weights decayed if configured.
- ``WarmupDecayLR``: linear warmup, then linear / cosine decay to ``min_lr`` (a client scheduler,
  saved in DeepSpeed checkpoints).
- ``build_engine``: model -> deepspeed.initialize with a client torch AdamW (no FusedAdam JIT build).
- ``train_step`` / ``eval_step``: one optimizer step over this rank's micro-batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import Config, ConfigError, deepspeed_config


# --------------------------------------------------------------------------------------------------
# megatron parallel_state -> DeepSpeed's mpu interface
# --------------------------------------------------------------------------------------------------
class MegatronMPU:
    """The ``mpu`` object DeepSpeed expects, backed by megatron-core's parallel_state."""

    def __init__(self):
        from megatron.core import parallel_state

        self.ps = parallel_state

    # tensor parallel
    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    # pipeline parallel
    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    # model parallel = TP x PP: grad-norm reduction and checkpoint file naming (mp_rank_XX)
    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.ps.get_model_parallel_group())

    def get_model_parallel_rank(self):
        return dist.get_rank(self.ps.get_model_parallel_group())

    def get_model_parallel_src_rank(self):
        return self.ps.get_model_parallel_src_rank()

    # data parallel
    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.ps.get_data_parallel_group())


# --------------------------------------------------------------------------------------------------
# Optimizer parameter groups and LR schedule
# --------------------------------------------------------------------------------------------------
def _is_norm_weight(name: str, module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower() or "norm" in name


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Two AdamW groups: decayed (matrices, embeddings, LayerNorm weights if decay_norm_weights) and
    not decayed (every bias; LayerNorm weights otherwise)."""
    decay, no_decay = [], []
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if p_name == "bias" or (not cfg.optimizer.decay_norm_weights and _is_norm_weight(mod_name, module)):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.optimizer.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


class WarmupDecayLR:
    """lr(k) for optimizer step k (0-based): max_lr * k / warmup during warmup, then linear or cosine
    decay from max_lr to min_lr at ``decay_iters``, min_lr after. ``step()`` is called by DeepSpeed
    after each applied optimizer step (skipped fp16 steps do not advance it)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_lr: float, min_lr: float, warmup_iters: int,
                 decay_iters: int, decay_style: str):
        self.optimizer = optimizer
        self.max_lr, self.min_lr = max_lr, min_lr
        self.warmup_iters, self.decay_iters, self.decay_style = warmup_iters, decay_iters, decay_style
        self.num_steps = 0
        self._apply()

    def get_lr(self, step: int | None = None) -> float:
        k = self.num_steps if step is None else step
        if self.warmup_iters > 0 and k < self.warmup_iters:
            return self.max_lr * k / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        span = max(1, self.decay_iters - self.warmup_iters)
        frac = min(1.0, (k - self.warmup_iters) / span)
        if self.decay_style == "linear":
            coeff = 1.0 - frac
        else:  # cosine
            coeff = 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.min_lr + (self.max_lr - self.min_lr) * coeff

    def get_last_lr(self) -> list[float]:
        return [self.get_lr()]

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, *args, **kwargs) -> None:
        self.num_steps += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps}

    def load_state_dict(self, state: dict) -> None:
        self.num_steps = int(state["num_steps"])
        self._apply()


# --------------------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------------------
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
    """What the loop needs: the DeepSpeed engine and a few facts about this rank."""

    engine: object
    cfg: Config
    num_microbatches: int
    is_last_stage: bool

    @property
    def lr(self) -> float:
        return self.engine.lr_scheduler.get_lr()


def build_engine(cfg: Config, model: torch.nn.Module) -> Trainer:
    import deepspeed
    from megatron.core import parallel_state

    world = dist.get_world_size()
    if cfg.precision.dtype == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision.dtype=fp16: DeepSpeed supports fp16 only on CUDA devices; use bf16 or fp32 on CPU")
    if cfg.parallel.pipeline_parallel > 1:
        raise ConfigError("parallel.pipeline_parallel > 1 is not supported by the training loop yet")
    if cfg.parallel.sequence_parallel:
        _allreduce_sequence_parallel_grads(model)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg), lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps,
    )
    scheduler = WarmupDecayLR(
        optimizer, max_lr=cfg.optimizer.lr, min_lr=cfg.schedule.min_lr, warmup_iters=cfg.schedule.warmup_iters,
        decay_iters=cfg.schedule.decay_iters or cfg.train.train_iters, decay_style=cfg.schedule.decay_style,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world),
        mpu=MegatronMPU(), dist_init_required=False,
    )
    return Trainer(engine=engine, cfg=cfg, num_microbatches=cfg.grad_accumulation_steps(world),
                   is_last_stage=parallel_state.is_pipeline_last_stage())


def masked_lm_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose loss_mask is 1."""
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"]
    return (per_token.float() * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class StepResult:
    loss: float  # mean over this step's micro-batches and data-parallel ranks
    grad_norm: float | None
    loss_scale: float | None
    lr: float  # the learning rate this step used
    skipped: bool  # fp16 overflow: no update


def train_step(t: Trainer, micro_batches: list[dict]) -> StepResult:
    """Forward + backward each micro-batch (DeepSpeed accumulates, reduces over DP and steps at the
    last one), then the step's statistics."""
    engine = t.engine
    lr = t.lr
    losses = []
    skipped_before = engine.skipped_steps
    grad_norm = None
    for i, batch in enumerate(micro_batches):
        loss = masked_lm_loss(engine, batch)
        engine.backward(loss)
        if i == len(micro_batches) - 1 and _plain_fp32(engine):
            grad_norm = grad_norm_fp32(engine.module)  # DeepSpeed keeps no norm for plain optimizers
        engine.step()
        losses.append(loss.detach())
    if grad_norm is None:
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else None
    return StepResult(
        loss=_dp_mean(torch.stack(losses).mean()), grad_norm=grad_norm, loss_scale=_loss_scale(engine), lr=lr,
        skipped=engine.skipped_steps > skipped_before,
    )


@torch.no_grad()
def eval_loss(t: Trainer, micro_batches: list[dict]) -> float:
    t.engine.eval()
    try:
        losses = [masked_lm_loss(t.engine, b) for b in micro_batches]
    finally:
        t.engine.train()
    return _dp_mean(torch.stack(losses).mean())


def _dp_mean(x: torch.Tensor) -> float:
    from megatron.core import parallel_state

    x = x.detach().float().clone()
    dist.all_reduce(x, group=parallel_state.get_data_parallel_group())
    return float(x) / parallel_state.get_data_parallel_world_size()


def _plain_fp32(engine) -> bool:
    return not (engine.fp16_enabled() or engine.bfloat16_enabled() or engine.zero_optimization())


def _loss_scale(engine):
    scale = getattr(engine.optimizer, "cur_scale", None)
    if scale is None:
        scale = getattr(getattr(engine.optimizer, "loss_scaler", None), "cur_scale", None)
    return float(scale) if scale is not None and engine.fp16_enabled() else None


def grad_norm_fp32(model: torch.nn.Module) -> float:
    """Global L2 norm of the (DP-reduced) gradients: TP-sharded parameters summed over the model-
    parallel group, TP-duplicated ones counted once (on TP rank 0)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            sq += p.grad.double().pow(2).sum()
    dist.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    return float(sq.sqrt())
