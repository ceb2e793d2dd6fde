"""The optimizer: AdamW groups by parameter role, the LR schedule, and our fp32 gradient clipping.

- ``param_groups``: AdamW groups by parameter role (``decay_role``): biases and 1-D parameters never
  decayed, LayerNorm weights only if ``optimizer.decay_norm_weights``.
- ``build_optimizer``: a client torch AdamW (no FusedAdam JIT build); DeepSpeed's CPU AdamW under
  ZeRO-Offload.
- ``WarmupDecayLR`` / ``build_scheduler``: linear warmup, then linear / cosine decay to ``min_lr`` (a
  client scheduler, saved in DeepSpeed checkpoints).
- ``clip_grads_fp32``: the global grad norm over TP x PP and clipping, where we clip instead of
  DeepSpeed (``clips_itself``).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .config import Config
from .model import device


# --------------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------------
def _is_norm_module(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def decay_role(param_name: str, param: torch.Tensor, module: torch.nn.Module) -> str:
    """The parameter's role for weight decay (``param_name`` is its name inside ``module``):

    - "bias": named ``bias`` or ``*_bias``, of any shape (linear biases, the gates' biases, e.g. the
      MLP gate's per-head ``fc1_bias``);
    - "norm_weight": the scale of a normalisation layer (LayerNorm/RMSNorm);
    - "vector": any other 1-D parameter (the learnable ``softmax_offset``, ...);
    - "matrix": everything else (linear weights, embeddings, per-head gate weights).
    megatron-core's rule (megatron/core/optimizer: no decay for ``*.bias`` and 1-D parameters) by role,
    extended to biases that are not 1-D. A variant's tensor (offset, gate) says itself whether it is
    decayed (``param.variant_tensor``, ``ops.variants.variant_tensors``): "matrix" if so, else "bias" / "vector"."""
    described = getattr(param, "variant_tensor", None)
    if described is not None:
        return "matrix" if described.decay else ("bias" if described.name.endswith("bias") else "vector")
    if param_name == "bias" or param_name.endswith("_bias"):
        return "bias"
    if param.dim() <= 1:
        return "norm_weight" if param_name == "weight" and _is_norm_module(module) else "vector"
    return "matrix"


def decays(role: str, cfg: Config) -> bool:
    """Whether a parameter of this role is weight-decayed: matrices always; LayerNorm weights iff
    ``optimizer.decay_norm_weights`` (the paper's OPT recipe decays them; megatron-core does not);
    biases and other 1-D parameters never."""
    return role == "matrix" or (role == "norm_weight" and cfg.optimizer.decay_norm_weights)


def param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """Two AdamW groups by ``decay_role`` / ``decays``: "decay" (weight_decay) and "no_decay" (0)."""
    decay, no_decay = [], []
    for module in model.modules():
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (decay if decays(decay_role(p_name, p, module), cfg) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optimizer.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over ``param_groups(model, cfg)`` with optimizer.lr / betas / eps."""
    adamw = dict(lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps)
    if cfg.parallel.cpu_offload:
        # ZeRO-Offload steps on the CPU: DeepSpeed's vectorised CPU AdamW (JIT-built once into
        # TORCH_EXTENSIONS_DIR); DeepSpeed refuses a torch optimizer there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups(model, cfg), adamw_mode=True, **adamw)
    return torch.optim.AdamW(param_groups(model, cfg), **adamw)


# --------------------------------------------------------------------------------------------------
# LR schedule
# --------------------------------------------------------------------------------------------------
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


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> WarmupDecayLR:
    """The schedule of ``cfg.schedule`` from optimizer.lr; decay_iters defaults to train.train_iters."""
    return WarmupDecayLR(
        optimizer, max_lr=cfg.optimizer.lr, min_lr=cfg.schedule.min_lr, warmup_iters=cfg.schedule.warmup_iters,
        decay_iters=cfg.schedule.decay_iters or cfg.train.train_iters, decay_style=cfg.schedule.decay_style,
    )


# --------------------------------------------------------------------------------------------------
# Gradient clipping (fp32 ZeRO-0)
# --------------------------------------------------------------------------------------------------
def clips_itself(cfg: Config) -> bool:
    """Whether we clip instead of DeepSpeed: fp32 + ZeRO-0. DeepSpeed's fp32 ZeRO-0 clipping counts
    TP-duplicated parameters only on model-parallel rank 0, which drops every later pipeline stage's
    LayerNorms and biases from the norm. ZeRO >= 1 and bf16 / fp16 use DeepSpeed's own clipping."""
    return cfg.parallel.zero_stage == 0 and cfg.precision.dtype == "fp32"


def clip_grads_fp32(model: torch.nn.Module, max_norm: float) -> float:
    """Global grad norm (see grad_norm_fp32); gradients scaled down to max_norm if above (0: off)."""
    norm = grad_norm_fp32(model)
    if max_norm > 0:
        coeff = max_norm / (norm + 1e-6)
        if coeff < 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coeff)
    return norm


def grad_norm_fp32(model: torch.nn.Module) -> float:
    """Global L2 norm of the (DP-reduced) gradients: TP-sharded parameters summed over the model-
    parallel group, TP-duplicated ones counted once (on TP rank 0)."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    sq = torch.zeros((), dtype=torch.float64, device=device())
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "shared", False):  # the last stage's copy of the tied embedding: counted once
            continue
        if getattr(p, "tensor_model_parallel", False) or tp_rank == 0:
            sq += p.grad.double().pow(2).sum()
    dist.all_reduce(sq, group=parallel_state.get_model_parallel_group())
    return float(sq.sqrt())
