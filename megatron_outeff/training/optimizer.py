"""The optimizer: groups by parameter role, the optimizer of ``optimizer.type``, the LR schedule, and
our fp32 gradient clipping.

- ``param_groups``: weight-decay groups by parameter role (``decay_role``): biases and 1-D parameters
  never decayed, LayerNorm weights only if ``optimizer.decay_norm_weights``. Every optimizer type
  keeps these roles.
- ``build_optimizer``: the client optimizer DeepSpeed wraps, by ``optimizer.type``: ``adamw`` (torch
  AdamW, no FusedAdam JIT build; DeepSpeed's CPU AdamW under ZeRO-Offload), ``orthoadam`` (ours,
  training/orthoadam.py, rotations from ``orthoadam_rotations``), ``sgd`` (torch SGD with momentum),
  ``muon`` (DeepSpeed's MuonWithAuxAdam: Muon for the hidden matrices, AdamW for the rest).
- which layouts each optimizer can run: ``config.optimizer_layout_refusal`` (checked when the config loads);
  ``state_keys``: its per-element state, for training/elastic.py.
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
    groups = [
        {"params": decay, "weight_decay": cfg.optimizer.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


# --------------------------------------------------------------------------------------------------
# The optimizer of optimizer.type
# --------------------------------------------------------------------------------------------------
SGD_MOMENTUM, MUON_MOMENTUM = 0.9, 0.95  # optimizer.momentum=null: torch's usual heavy ball, DeepSpeed's Muon default


def momentum(cfg: Config) -> float:
    o = cfg.optimizer
    return o.momentum if o.momentum is not None else (MUON_MOMENTUM if o.type == "muon" else SGD_MOMENTUM)


def state_keys(cfg: Config) -> tuple[str, ...] | None:
    """The optimizer's per-element state tensors (what training/elastic.py saves per parameter and
    moves to another layout), or None where they cannot be mapped per parameter (muon: DeepSpeed
    keeps Muon's momentum in its own per-rank flat buffers under ZeRO-1/2)."""
    t = cfg.optimizer.type
    if t in ("adamw", "orthoadam"):
        return ("exp_avg", "exp_avg_sq")  # OrthoAdam's: in its rotated basis
    if t == "sgd":
        return ("momentum_buffer",) if momentum(cfg) > 0 else ()
    return None


def global_parameter_names(model: torch.nn.Module) -> dict[int, str]:
    """{id(parameter): its name with the global layer number} for this rank's model (a pipeline stage
    numbers its layers from 0; ``layer_number`` is global): a key that is the same at every layout."""
    from .model import unwrap

    gpt = unwrap(model)
    layers = getattr(getattr(gpt, "decoder", None), "layers", [])
    out = {}
    for name, param in gpt.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"] and len(parts) > 2 and parts[2].isdigit():
            parts[2] = str(layers[int(parts[2])].layer_number - 1)
        out[id(param)] = ".".join(parts)
    return out


def orthoadam_rotations(model: torch.nn.Module, cfg: Config):
    """The rotation callable OrthoAdam takes: per axis of a parameter, ``orthoadam.axis_rotation``
    seeded by (optimizer.rotation_seed, the parameter's global name, the axis). Under tensor
    parallelism the split axis (``partition_dim`` of a ``tensor_model_parallel`` parameter) is also
    keyed by the TP rank and size: the whole tensor then has a block-diagonal rotation on that axis (one
    Haar block per rank), the other axes the same rotation on every rank."""
    from megatron.core import parallel_state as ps

    from .orthoadam import axis_rotation

    names = global_parameter_names(model)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    o = cfg.optimizer

    def rotations(p: torch.Tensor):
        if id(p) not in names:
            raise ValueError(f"OrthoAdam: a parameter of shape {tuple(p.shape)} is not one of the model's")
        split = p.partition_dim if getattr(p, "tensor_model_parallel", False) and tp > 1 else None
        return [
            axis_rotation(
                n,
                o.rotation_seed,
                f"{names[id(p)]}/axis{axis}" + (f"/tp{tp_rank}of{tp}" if axis == split else ""),
                o.rotation_block_size,
            )
            for axis, n in enumerate(p.shape)
        ]

    return rotations


def _is_embedding(param: torch.nn.Parameter, module: torch.nn.Module) -> bool:
    return (
        getattr(param, "is_embedding_or_output_parameter", False)
        or isinstance(module, torch.nn.Embedding)
        or "embedding" in type(module).__name__.lower()
    )


def muon_param_groups(model: torch.nn.Module, cfg: Config) -> list[dict]:
    """The role groups split into Muon halves (hidden matrices: role "matrix" and not an embedding or
    the output layer, tagged ``use_muon`` for DeepSpeed's ZeRO code) and AdamW halves (the rest), with
    each role group's weight decay; the Muon half's lr is ``optimizer.muon_lr`` (``lr_scale`` keeps its
    ratio to ``lr`` under the schedule)."""
    o = cfg.optimizer
    muon_params = set()
    for module in model.modules():
        for p_name, p in module.named_parameters(recurse=False):
            if decay_role(p_name, p, module) == "matrix" and not _is_embedding(p, module):
                muon_params.add(id(p))
    scale = (o.muon_lr if o.muon_lr is not None else o.lr) / o.lr
    groups = []
    for g in param_groups(model, cfg):
        for use_muon in (True, False):
            half = [p for p in g["params"] if (id(p) in muon_params) is use_muon]
            for p in half:
                p.use_muon = use_muon
            if not half:
                continue
            settings = (
                dict(momentum=momentum(cfg), ns_method="gram", lr_scale=scale)
                if use_muon
                else dict(betas=tuple(o.betas), eps=o.eps)
            )
            groups.append(
                dict(
                    params=half,
                    use_muon=use_muon,
                    name=f"{g['name']}-{'muon' if use_muon else 'adam'}",
                    lr=o.lr * (scale if use_muon else 1.0),
                    weight_decay=g["weight_decay"],
                    **settings,
                )
            )
    return groups


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The client optimizer of ``optimizer.type`` over the role groups (module doc)."""
    o = cfg.optimizer
    adamw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if o.type == "orthoadam":
        from .orthoadam import OrthoAdam

        return OrthoAdam(param_groups(model, cfg), orthoadam_rotations(model, cfg), **adamw)
    if o.type == "sgd":  # weight decay as torch's SGD applies it: L2, added to the gradient
        return torch.optim.SGD(param_groups(model, cfg), lr=o.lr, momentum=momentum(cfg), nesterov=o.nesterov)
    if o.type == "muon":
        # DeepSpeed's own Muon (the class its "muon" config builds), as a client optimizer over our role
        # groups; its AdamW half runs inline (no FusedAdam build).
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

        return MuonWithAuxAdam(muon_param_groups(model, cfg))
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

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        max_lr: float,
        min_lr: float,
        warmup_iters: int,
        decay_iters: int,
        decay_style: str,
    ):
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
            group["lr"] = lr * group.get("lr_scale", 1.0)  # lr_scale: Muon's half (muon_param_groups)

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
        optimizer,
        max_lr=cfg.optimizer.lr,
        min_lr=cfg.schedule.min_lr,
        warmup_iters=cfg.schedule.warmup_iters,
        decay_iters=cfg.schedule.decay_iters or cfg.train.train_iters,
        decay_style=cfg.schedule.decay_style,
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
