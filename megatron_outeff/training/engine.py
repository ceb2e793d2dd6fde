"""DeepSpeed around a megatron-core model: the only module (with checkpoint.py) that imports DeepSpeed.

- ``MegatronMPU``: megatron's parallel_state under the names DeepSpeed calls, so DeepSpeed reduces
  gradients over the data-parallel group only (never across TP shards) and sums grad norms over the
  model-parallel group (TP x PP), counting TP-duplicated parameters once.
- ``param_groups``: AdamW groups by parameter role (``decay_role``): biases and 1-D parameters never
  decayed, LayerNorm weights only if ``optimizer.decay_norm_weights``.
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
    extended to biases that are not 1-D."""
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
    pipelined: bool = False

    @property
    def lr(self) -> float:
        return self.engine.lr_scheduler.get_lr()


def build_engine(cfg: Config, model: torch.nn.Module) -> Trainer:
    import deepspeed
    from megatron.core import parallel_state

    world = dist.get_world_size()
    if cfg.precision.dtype == "fp16" and not torch.cuda.is_available():
        raise ConfigError("precision.dtype=fp16: DeepSpeed supports fp16 only on CUDA devices; use bf16 or fp32 on CPU")
    pipelined = cfg.parallel.pipeline_parallel > 1
    if pipelined and cfg.precision.dtype == "fp16":
        # the schedule would need DeepSpeed's loss scale as grad_scale_func: not wired yet
        raise ConfigError("parallel.pipeline_parallel > 1 supports precision.dtype fp32 or bf16, not fp16 (yet)")
    if cfg.parallel.sequence_parallel:
        _allreduce_sequence_parallel_grads(model)
    adamw = dict(lr=cfg.optimizer.lr, betas=tuple(cfg.optimizer.betas), eps=cfg.optimizer.eps)
    if cfg.parallel.cpu_offload:
        # ZeRO-Offload steps on the CPU: DeepSpeed's vectorised CPU AdamW (JIT-built once into
        # TORCH_EXTENSIONS_DIR); DeepSpeed refuses a torch optimizer there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(param_groups(model, cfg), adamw_mode=True, **adamw)
    else:
        optimizer = torch.optim.AdamW(param_groups(model, cfg), **adamw)
    scheduler = WarmupDecayLR(
        optimizer, max_lr=cfg.optimizer.lr, min_lr=cfg.schedule.min_lr, warmup_iters=cfg.schedule.warmup_iters,
        decay_iters=cfg.schedule.decay_iters or cfg.train.train_iters, decay_style=cfg.schedule.decay_style,
    )
    ds_config = deepspeed_config(cfg, world)
    own_clipping = cfg.parallel.zero_stage == 0 and cfg.precision.dtype == "fp32"
    if own_clipping:
        # DeepSpeed's fp32 ZeRO-0 clipping counts TP-duplicated parameters only on model-parallel
        # rank 0, which drops every later pipeline stage's LayerNorms and biases: we clip ourselves.
        ds_config["gradient_clipping"] = 0.0
    if pipelined:
        # megatron's pipeline schedule runs all micro-batches' forward/backward itself; DeepSpeed then
        # reduces over DP and steps once: every engine.step() is the accumulation boundary.
        ds_config["managed_gradient_accumulation"] = False
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
        mpu=MegatronMPU(), dist_init_required=False,
    )
    if pipelined and own_clipping:
        engine.enable_backward_allreduce = False  # we average over DP before clipping (pipeline_train_step)
    return Trainer(engine=engine, cfg=cfg, num_microbatches=cfg.grad_accumulation_steps(world),
                   is_last_stage=parallel_state.is_pipeline_last_stage(), pipelined=pipelined)


def device() -> torch.device:
    """Where this rank computes (and where NCCL collectives need their tensors)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def to_device(batch: dict) -> dict:
    return {k: v.to(device(), non_blocking=True) for k, v in batch.items()}


def masked_lm_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over the tokens whose loss_mask is 1."""
    batch = to_device(batch)
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
    if t.pipelined:
        return pipeline_train_step(t, micro_batches)
    engine = t.engine
    lr = t.lr
    losses = []
    skipped_before = engine.skipped_steps
    grad_norm = None
    for i, batch in enumerate(micro_batches):
        loss = masked_lm_loss(engine, batch)
        engine.backward(loss)
        if i == len(micro_batches) - 1 and _plain_fp32(engine):  # grads are DP-reduced by now
            grad_norm = clip_grads_fp32(engine.module, t.cfg.train.clip_grad)
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
        if t.pipelined:
            sync_tied_embedding(t.engine.module)
            return _dp_mean(_pipeline_loss(_run_pipeline(t, micro_batches, forward_only=True)))
        losses = [masked_lm_loss(t.engine, b) for b in micro_batches]
    finally:
        t.engine.train()
    return _dp_mean(torch.stack(losses).mean())


# --------------------------------------------------------------------------------------------------
# Pipeline parallelism: megatron's schedule computes the gradients, DeepSpeed reduces and steps
# --------------------------------------------------------------------------------------------------
def _run_pipeline(t: Trainer, micro_batches: list[dict], forward_only: bool) -> list[dict]:
    from megatron_outeff.megatron.cpu_support import cpu_safe_forward_backward_func

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token):
            mask = batch["loss_mask"]
            loss = (per_token.float() * mask).sum() / mask.sum().clamp(min=1)
            # megatron divides the returned loss by num_microbatches in place: log a copy
            return loss, {"lm loss": loss.detach().clone()}

        return output, loss_func

    schedule = cpu_safe_forward_backward_func()
    return schedule(
        forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[t.engine.module],
        num_microbatches=len(micro_batches), seq_length=micro_batches[0]["tokens"].shape[1],
        micro_batch_size=micro_batches[0]["tokens"].shape[0], forward_only=forward_only,
    )


def _pipeline_loss(outputs: list[dict]) -> torch.Tensor:
    """Mean micro-batch loss, from the last stage to every stage of the pipeline."""
    from megatron.core import parallel_state

    loss = torch.stack([o["lm loss"] for o in outputs]).mean() if outputs else torch.zeros((), device=device())
    loss = loss.float().reshape(())
    dist.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())  # zero elsewhere
    return loss


def _tied_embedding(module: torch.nn.Module):
    """The tied word-embedding / output-layer weight if this rank holds one under PP, else None."""
    from megatron.core import parallel_state

    if not parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        return None
    model = unwrap_module(module)
    if not getattr(model, "share_embeddings_and_output_weights", False):
        return None
    return model.shared_embedding_or_output_weight()


def sync_tied_embedding(module: torch.nn.Module) -> None:
    """Under PP the tied matrix is held twice: by the first stage (word embedding: the copy the
    optimizer updates) and by the last stage (output layer, marked ``shared``). Copy the first
    stage's into the last stage's, before every step (so also right after a resume)."""
    from megatron.core import parallel_state

    weight = _tied_embedding(module)
    if weight is not None:
        dist.broadcast(weight.data, src=parallel_state.get_pipeline_model_parallel_first_rank(),
                       group=parallel_state.get_embedding_group())


def _allreduce_tied_embedding_grads(module: torch.nn.Module) -> None:
    """Sum the two copies' gradients over the embedding group; the last stage's copy then drops its
    gradient, so DeepSpeed neither updates it nor counts it twice in the grad norm."""
    from megatron.core import parallel_state

    weight = _tied_embedding(module)
    if weight is None:
        return
    if weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    dist.all_reduce(weight.grad, group=parallel_state.get_embedding_group())
    if getattr(weight, "shared", False):
        weight.grad = None


def pipeline_train_step(t: Trainer, micro_batches: list[dict]) -> StepResult:
    engine = t.engine
    lr = t.lr
    sync_tied_embedding(engine.module)
    outputs = _run_pipeline(t, micro_batches, forward_only=False)
    _allreduce_tied_embedding_grads(engine.module)
    if _plain_fp32(engine):
        _allreduce_dp_mean(engine.module)
        grad_norm = clip_grads_fp32(engine.module, t.cfg.train.clip_grad)
        engine.step()  # update, LR schedule
    else:
        engine.step()  # ZeRO-1: reduce over DP, clip, update, LR schedule
        norm = engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else None
    return StepResult(loss=_dp_mean(_pipeline_loss(outputs)), grad_norm=grad_norm, loss_scale=None, lr=lr,
                      skipped=False)


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    while hasattr(module, "module"):
        module = module.module
    return module


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


def _allreduce_dp_mean(model: torch.nn.Module) -> None:
    from megatron.core import parallel_state

    group = parallel_state.get_data_parallel_group()
    size = parallel_state.get_data_parallel_world_size()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


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
