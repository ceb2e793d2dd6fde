"""Build this rank's megatron-core OPT model (its TP shard / PP stage) from the typed config.

``build_model(cfg)`` is the single place the training code, the benchmarks and the tests get a model
from: the OPT builder (megatron_outeff.models.opt) with the attention variant of ``cfg.attention``,
wrapped in megatron's Float16Module for fp16/bf16 (it casts the parameters and the first stage's
inputs). ``device()``: where this rank's model runs. Knows nothing of DeepSpeed.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import Config, ConfigError


def arch_config(cfg: Config):
    """The OPTArchConfig of model.arch with model.arch_overrides applied."""
    from megatron_outeff.models.opt import OPTArchConfig, load_arch_config

    try:
        arch = load_arch_config(cfg.model.arch)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConfigError(f"model.arch={cfg.model.arch!r}: {e}") from None
    names = {f.name for f in dataclasses.fields(OPTArchConfig)}
    for key in cfg.model.arch_overrides:
        if key not in names:
            raise ConfigError(f"unknown config key 'model.arch_overrides.{key}' (not an OPTArchConfig field)")
    try:
        arch = dataclasses.replace(arch, **cfg.model.arch_overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.arch_overrides: {e}") from None
    if cfg.data.seq_length > arch.max_position_embeddings:
        raise ConfigError(
            f"data.seq_length={cfg.data.seq_length} exceeds max_position_embeddings={arch.max_position_embeddings}"
        )
    return arch


def attention_variant(cfg: Config):
    """cfg.attention: the typed AttentionVariantConfig (parsed and validated when the config loaded)."""
    return cfg.attention


def check_model(cfg: Config) -> None:
    """Every model-defining key checked when the config is loaded, before anything is built or written:
    model.arch and model.arch_overrides (OPTArchConfig fields), the attention variant (with
    data.seq_length for the clip_alpha form), the TP/PP layout, model.vocab_size, and megatron's
    TransformerConfig built from the arch and model.transformer_overrides (its own field names and
    checks). Builds no module. Raises ConfigError naming the bad key."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_outeff.models.opt import check_parallel_layout, opt_transformer_config

    arch = arch_config(cfg)
    variant = attention_variant(cfg)
    try:
        variant.clip_pair(cfg.data.seq_length)
    except ValueError as e:
        raise ConfigError(f"attention: {e}") from None
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    try:
        check_parallel_layout(arch, tp, pp)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    vocab = cfg.model.vocab_size
    if vocab is not None and (vocab < arch.vocab_size or vocab % tp):
        raise ConfigError(f"model.vocab_size={vocab}: expected >= the arch's {arch.vocab_size} and divisible by "
                          f"tensor_parallel={tp}")
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    for key in cfg.model.transformer_overrides:
        if key not in fields:
            raise ConfigError(f"unknown config key 'model.transformer_overrides.{key}' "
                              "(not a megatron TransformerConfig field)")
    try:
        opt_transformer_config(arch, **transformer_overrides(cfg))
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"model.transformer_overrides: megatron's TransformerConfig refuses them: {e}") from None


def transformer_overrides(cfg: Config) -> dict:
    """TransformerConfig fields set by the training config (on top of the arch's)."""
    over = dict(cfg.model.transformer_overrides)
    # Identical initial weights for every TP layout: TP shards are exact slices of the full matrices.
    over.setdefault("use_cpu_initialization", True)
    over["fp16"] = cfg.precision.dtype == "fp16"
    over["bf16"] = cfg.precision.dtype == "bf16"
    if cfg.precision.dtype != "fp32":
        over["pipeline_dtype"] = torch.float16 if cfg.precision.dtype == "fp16" else torch.bfloat16
    if cfg.model.recompute_granularity:
        over["recompute_granularity"] = cfg.model.recompute_granularity
        if cfg.model.recompute_granularity == "full":
            over["recompute_method"] = cfg.model.recompute_method or "uniform"
            over["recompute_num_layers"] = cfg.model.recompute_num_layers or 1
    return over


def build_model(cfg: Config, *, pre_process: bool | None = None, post_process: bool | None = None) -> torch.nn.Module:
    """This rank's model: its TP shard of the pipeline stage parallel_state gives it (the embedding if
    ``pre_process``, the output layer and loss if ``post_process``; both by default on the first / last
    stage). Raises ConfigError for a model the config cannot build."""
    from megatron.core import parallel_state as ps

    from megatron_outeff.models.opt import build_opt_model

    pre_process = ps.is_pipeline_first_stage() if pre_process is None else pre_process
    post_process = ps.is_pipeline_last_stage() if post_process is None else post_process
    arch = arch_config(cfg)
    try:
        model = build_opt_model(
            arch, attention_variant(cfg), vocab_size=cfg.model.vocab_size, params_dtype=torch.float32,
            sequence_parallel=cfg.parallel.sequence_parallel, pre_process=pre_process, post_process=post_process,
            seq_length=cfg.data.seq_length,  # clipped variants in the clip_alpha form
            **transformer_overrides(cfg),
        )
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
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
