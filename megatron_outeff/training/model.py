"""Build this rank's megatron-core model (its TP shard / PP stage) from the typed config.

``build_model(cfg)`` is the single place the training code, the benchmarks and the tests get a model
from: the builder of model.arch's family (models/family.py: OPT, Llama) with the attention variant of ``cfg.attention``,
wrapped in megatron's Float16Module for fp16/bf16 (it casts the parameters and the first stage's
inputs). ``device()``: where this rank's model runs. Knows nothing of DeepSpeed. The model section's
checks (architecture, overrides, variant) belong to the config (``config.check_model``): this module
imports the config, never the other way round.
"""

from __future__ import annotations

import torch

from megatron_outeff.errors import OutEffError, with_context

# The model section's checks and derived values are the config's (validated when it loads); re-exported here
# for the builders.
from .config import Config, arch_config, attention_variant, transformer_overrides  # noqa: F401


def build_model(cfg: Config, *, pre_process: bool | None = None, post_process: bool | None = None) -> torch.nn.Module:
    """This rank's model: its TP shard of the pipeline stage parallel_state gives it (the embedding if
    ``pre_process``, the output layer and loss if ``post_process``; both by default on the first / last
    stage). Raises OutEffError for a model the config cannot build."""
    from megatron.core import parallel_state as ps

    from megatron_outeff.models.family import family_of

    pre_process = ps.is_pipeline_first_stage() if pre_process is None else pre_process
    post_process = ps.is_pipeline_last_stage() if post_process is None else post_process
    arch, variant = arch_config(cfg), attention_variant(cfg)  # each raises its own complete OutEffError
    try:
        model = family_of(arch).arch.build_model(
            arch,
            variant,
            vocab_size=cfg.model.vocab_size,
            params_dtype=torch.float32,
            sequence_parallel=cfg.parallel.sequence_parallel,
            pre_process=pre_process,
            post_process=post_process,
            seq_length=cfg.data.seq_length,  # clipped variants in the clip_alpha form
            **transformer_overrides(cfg),
        )
    except OutEffError:
        raise
    except ValueError as e:  # megatron's own checks (everything of ours was checked at load, check_model)
        raise with_context("model", e) from None
    if cfg.precision.dtype in ("fp16", "bf16"):
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The megatron GPTModel inside DeepSpeed / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def device() -> torch.device:
    """Where this rank computes (and where NCCL collectives need their tensors): its CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
