"""One optimizer step and the validation loss, over this rank's micro-batches, with one loss (``lm_loss``).

- ``train_step``: forward + backward of every micro-batch, the data-parallel reduction, clipping, the
  update and the LR schedule; returns the step's statistics (``StepResult``).
  Without pipeline parallelism DeepSpeed accumulates the micro-batches and reduces / clips / steps at
  the last one. With it (``pipeline_train_step``) megatron's 1F1B schedule runs every micro-batch's
  forward and backward across the stages, then DeepSpeed reduces over DP and steps once.
- ``eval_loss``: the same loss without gradients.

The loss of a step is per token of the whole global batch: the sum of the masked per-token losses of
every micro-batch on every data-parallel rank, divided by the global batch's number of unmasked tokens
(``global_token_count``, one all-reduce over DP before the forward passes), as megatron-core's per-token
loss (``calculate_per_token_loss``) and transformers' gradient-accumulation fix (``num_items_in_batch``)
do. Each micro-batch backpropagates its masked sum / that count, times DP because DeepSpeed averages the
gradients over the data-parallel ranks (and without DeepSpeed's division by the accumulation steps:
``scale_wrt_gas=False``; the pipeline schedule's division by the number of micro-batches is undone the
same way), so the gradient is that of the global per-token loss whatever the micro-batch size, the
accumulation or the DP size. Every rank reports the same loss.

Divergence (``TrainingDiverged``): the step's loss, and the gradient norm where we clip
(``optimizer.clips_itself``), are checked for NaN / inf (``utils.finite.require_finite``) right before
``engine.step()``, as megatron-core checks loss and gradients before its optimizer step. Where
DeepSpeed clips, its own check sees the non-finite gradient norm first and skips the update
(ZeRO 1-3, bf16 at ZeRO-0); ``SkippedSteps`` then stops the run: at the first skipped step in fp32 /
bf16, after ``precision.max_skipped_steps`` in a row in fp16 (its loss scaler skips overflowing
steps by design). Either way the weights are never updated from a non-finite step.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_outeff.errors import OutEffError
from megatron_outeff.utils.finite import require_finite

from .engine import Trainer
from .model import device, unwrap
from .optimizer import clip_grads_fp32


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm of a step is NaN / inf (or fp16 skipped too many steps in a row):
    training stops before that step's update. The CLI prints one ``error:`` line and exits with
    ``DIVERGED_EXIT_CODE``."""


DIVERGED_EXIT_CODE = 3  # distinct from bad input (2): rerunning the same command diverges again


def require_finite_step(value, what: str) -> None:
    """``utils.finite.require_finite`` for a step statistic (the same value on every rank: reduced over
    data / model / pipeline parallel ranks), raised as TrainingDiverged."""
    try:
        require_finite(value, what)
    except OutEffError as e:
        raise TrainingDiverged(str(e)) from None


def to_device(batch: dict) -> dict:
    return {k: v.to(device(), non_blocking=True) for k, v in batch.items()}


def lm_loss(per_token: torch.Tensor, loss_mask: torch.Tensor, num_tokens=None) -> torch.Tensor:
    """Next-token cross-entropy summed over the tokens whose loss_mask is 1, divided by ``num_tokens``
    (default: this batch's own count of them, i.e. its mean per token; in a step: the global batch's count,
    ``global_token_count``, so that the micro-batches' losses add up to the step's per-token mean; a count
    of 0 divides by 1). ``per_token`` [b, s]: megatron's per-token losses (the model called with
    ``labels``); ``loss_mask`` [b, s] of 0 / 1."""
    if num_tokens is None:
        num_tokens = loss_mask.sum()
    return (per_token.float() * loss_mask).sum() / torch.clamp(torch.as_tensor(num_tokens, dtype=torch.float32), min=1)


def global_token_count(micro_batches: list[dict]) -> torch.Tensor:
    """The number of unmasked tokens in these micro-batches on every data-parallel rank together (one
    all-reduce over the DP group; collective). Counted in float64: exact far beyond any batch."""
    from megatron.core import parallel_state

    count = torch.stack([b["loss_mask"].sum(dtype=torch.float64) for b in micro_batches]).sum().to(device())
    dist.all_reduce(count, group=parallel_state.get_data_parallel_group())
    return count


def _forward(model, batch: dict) -> torch.Tensor:
    """The model on a batch already on the device: per-token losses on the last pipeline stage, the
    hidden states for the next stage before it."""
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])


def masked_lm_loss(model, batch: dict, num_tokens=None) -> torch.Tensor:
    """``lm_loss`` of one micro-batch through the whole model (no pipeline parallelism)."""
    batch = to_device(batch)
    return lm_loss(_forward(model, batch), batch["loss_mask"], num_tokens)


@dataclass
class StepResult:
    loss: float  # per unmasked token of the whole global batch (every micro-batch and data-parallel rank)
    grad_norm: float | None
    loss_scale: float | None
    lr: float  # the learning rate this step used
    skipped: bool  # fp16 overflow: no update


def _dp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def train_step(t: Trainer, micro_batches: list[dict]) -> StepResult:
    """Forward + backward each micro-batch (DeepSpeed accumulates, reduces over DP and steps at the
    last one), then the step's statistics."""
    if t.pipelined:
        return pipeline_train_step(t, micro_batches)
    engine = t.engine
    lr = t.lr
    num_tokens = global_token_count(micro_batches)
    losses = []  # each micro-batch's share of the step's per-token loss
    skipped_before = engine.skipped_steps
    grad_norm = None
    for i, batch in enumerate(micro_batches):
        loss = masked_lm_loss(engine, batch, num_tokens)
        # DeepSpeed averages gradients over DP: x DP makes the sum over ranks; no division by accumulation steps
        engine.backward(loss * _dp_size(), scale_wrt_gas=False)
        losses.append(loss.detach())
        if i == len(micro_batches) - 1:  # the update comes with this engine.step(): check first
            step_loss = _dp_sum(torch.stack(losses).sum())
            require_finite_step(step_loss, "lm loss")
            if t.own_clipping:  # grads are DP-reduced by now
                grad_norm = clip_grads_fp32(engine.module, t.cfg.train.clip_grad)
                require_finite_step(grad_norm, "grad norm")
        engine.step()
    if grad_norm is None:
        grad_norm = _deepspeed_grad_norm(engine)
    return StepResult(
        loss=step_loss,
        grad_norm=grad_norm,
        loss_scale=_loss_scale(engine),
        lr=lr,
        skipped=engine.skipped_steps > skipped_before,
    )


@torch.no_grad()
def eval_loss(t: Trainer, micro_batches: list[dict]) -> float:
    """The loss per unmasked token of these micro-batches on every data-parallel rank together (eval mode,
    no gradients). Collective over DP."""
    num_tokens = global_token_count(micro_batches)
    t.engine.eval()
    try:
        if t.pipelined:
            sync_tied_embedding(t.engine.module)
            return _dp_sum(_pipeline_loss(_run_pipeline(t, micro_batches, num_tokens, forward_only=True)))
        losses = [masked_lm_loss(t.engine, b, num_tokens) for b in micro_batches]
    finally:
        t.engine.train()
    return _dp_sum(torch.stack(losses).sum())


# --------------------------------------------------------------------------------------------------
# Pipeline parallelism: megatron's schedule computes the gradients, DeepSpeed reduces and steps
# --------------------------------------------------------------------------------------------------
def pipeline_train_step(t: Trainer, micro_batches: list[dict]) -> StepResult:
    engine = t.engine
    lr = t.lr
    sync_tied_embedding(engine.module)
    outputs = _run_pipeline(t, micro_batches, global_token_count(micro_batches), forward_only=False)
    step_loss = _dp_sum(_pipeline_loss(outputs))
    require_finite_step(step_loss, "lm loss")
    _allreduce_tied_embedding_grads(engine.module)
    skipped_before = engine.skipped_steps
    if t.own_clipping:
        _allreduce_dp_mean(engine.module)
        grad_norm = clip_grads_fp32(engine.module, t.cfg.train.clip_grad)
        require_finite_step(grad_norm, "grad norm")
        engine.step()  # update, LR schedule
    else:
        engine.step()  # ZeRO-1: reduce over DP, clip (skipped on a non-finite norm), update, LR schedule
        grad_norm = _deepspeed_grad_norm(engine)
    return StepResult(
        loss=step_loss, grad_norm=grad_norm, loss_scale=None, lr=lr, skipped=engine.skipped_steps > skipped_before
    )


def _pipeline_loss_func(
    loss_mask: torch.Tensor, num_tokens: torch.Tensor, num_microbatches: int, per_token: torch.Tensor
):
    loss = lm_loss(per_token, loss_mask, num_tokens)  # this micro-batch's share of the step's per-token loss
    # megatron's schedule divides the returned loss by num_microbatches (and backpropagates that); DeepSpeed
    # then averages the gradients over DP: x (micro-batches x DP) gives the global per-token loss's gradient
    return loss * (num_microbatches * _dp_size()), {"lm loss": loss.detach().clone()}


def _run_pipeline(t: Trainer, micro_batches: list[dict], num_tokens: torch.Tensor, forward_only: bool) -> list[dict]:
    from megatron_outeff.megatron.cpu_support import cpu_safe_forward_backward_func

    def forward_step(data_iterator, model):
        batch = to_device(next(data_iterator))
        return _forward(model, batch), functools.partial(
            _pipeline_loss_func, batch["loss_mask"], num_tokens, len(micro_batches)
        )

    schedule = cpu_safe_forward_backward_func()
    return schedule(
        forward_step_func=forward_step,
        data_iterator=iter(micro_batches),
        model=[t.engine.module],
        num_microbatches=len(micro_batches),
        seq_length=micro_batches[0]["tokens"].shape[1],
        micro_batch_size=micro_batches[0]["tokens"].shape[0],
        forward_only=forward_only,
    )


def _pipeline_loss(outputs: list[dict]) -> torch.Tensor:
    """The sum of the micro-batches' shares of the per-token loss, from the last stage to every stage."""
    from megatron.core import parallel_state

    loss = torch.stack([o["lm loss"] for o in outputs]).sum() if outputs else torch.zeros((), device=device())
    loss = loss.float().reshape(())
    dist.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())  # zero elsewhere
    return loss


def _tied_embedding(module: torch.nn.Module):
    """The tied word-embedding / output-layer weight if this rank holds one under PP, else None."""
    from megatron.core import parallel_state

    if not parallel_state.is_rank_in_embedding_group(ignore_virtual=True):
        return None
    model = unwrap(module)
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
        dist.broadcast(
            weight.data,
            src=parallel_state.get_pipeline_model_parallel_first_rank(),
            group=parallel_state.get_embedding_group(),
        )


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


def _allreduce_dp_mean(model: torch.nn.Module) -> None:
    """Average the gradients over the data-parallel group (one flat all-reduce), where we clip before
    DeepSpeed's update and DeepSpeed's own reduction is off (pipelined fp32 ZeRO-0)."""
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
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


# --------------------------------------------------------------------------------------------------
# Step statistics
# --------------------------------------------------------------------------------------------------
class SkippedSteps:
    """Stops the run (TrainingDiverged) when DeepSpeed skipped ``limit`` optimizer steps in a row.

    DeepSpeed skips an update when the gradient norm is non-finite (its overflow check, before the
    update; every rank agrees). Without a loss scaler (fp32, bf16) nothing else makes it skip, so the
    first skipped step is divergence (limit 1; without this DeepSpeed would skip every later step
    too, with a warning, and save unchanged weights forever). In fp16 the dynamic loss scaler skips
    the overflowing steps by design while it lowers the scale: ``precision.max_skipped_steps`` in a
    row (0: never) means no scale helps."""

    def __init__(self, limit: int, fp16: bool):
        self.limit, self.fp16 = limit, fp16
        self.in_a_row = 0

    @classmethod
    def of(cls, cfg) -> "SkippedSteps":
        fp16 = cfg.precision.dtype == "fp16"
        return cls(cfg.precision.max_skipped_steps if fp16 else 1, fp16)

    def update(self, result: StepResult) -> None:
        self.in_a_row = self.in_a_row + 1 if result.skipped else 0
        if not self.limit or self.in_a_row < self.limit:
            return
        if not self.fp16:
            raise TrainingDiverged(
                f"grad norm is {result.grad_norm!r}: non-finite gradients (DeepSpeed skipped the "
                "update); expected a finite value"
            )
        raise TrainingDiverged(
            f"{self.in_a_row} steps in a row skipped by the fp16 loss scaler (non-finite gradients down to loss scale "
            f"{result.loss_scale}); expected fewer than precision.max_skipped_steps={self.limit}"
        )


def _dp_sum(x: torch.Tensor) -> float:
    """The sum over the data-parallel ranks (of their shares of a per-token loss)."""
    from megatron.core import parallel_state

    x = x.detach().float().clone()
    dist.all_reduce(x, group=parallel_state.get_data_parallel_group())
    return float(x)


def _deepspeed_grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else None


def _loss_scale(engine):
    scale = getattr(engine.optimizer, "cur_scale", None)
    if scale is None:
        scale = getattr(getattr(engine.optimizer, "loss_scaler", None), "cur_scale", None)
    return float(scale) if scale is not None and engine.fp16_enabled() else None
