"""Build this rank's megatron-core model (its TP shard / PP stage) from the typed config.

``build_model(cfg)`` is the single place the training code, the benchmarks and the tests get a model
from: the builder of model.arch's family (models/family.py: OPT, Llama) with the attention variant of ``cfg.attention``,
wrapped in megatron's Float16Module for fp16/bf16 (it casts the parameters and the first stage's
inputs). ``device()``: where this rank's model runs. Knows nothing of DeepSpeed.
"""
from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import typing

import torch

from megatron_outeff.errors import OutEffError, with_context

from .config import Config


# TransformerConfig fields the training config sets through its own keys (model.transformer_overrides
# refuses them, naming the key).
TRANSFORMER_FIELDS_OWNED = {
    "fp16": "precision.dtype", "bf16": "precision.dtype", "params_dtype": "precision.dtype",
    "pipeline_dtype": "precision.dtype", "sequence_parallel": "parallel.sequence_parallel",
    "tensor_model_parallel_size": "parallel.tensor_parallel", "pipeline_model_parallel_size": "parallel.pipeline_parallel",
    "recompute_granularity": "model.recompute_granularity", "recompute_method": "model.recompute_method",
    "recompute_num_layers": "model.recompute_num_layers", "softmax_type": "attention",
}


def arch_config(cfg: Config):
    """The architecture config (its family's ArchConfig: OPTArchConfig, LlamaArchConfig) of model.arch with
    model.arch_overrides applied (checked against that class's fields and types: the keys of a model
    YAML's arch: section)."""
    from megatron_outeff.models.family import family_for_arch

    from .config import typed_fields

    try:
        family = family_for_arch(cfg.model.arch)
        arch = family.arch.load_arch_config(cfg.model.arch)
    except (OutEffError, OSError) as e:
        raise with_context(f"model.arch={cfg.model.arch!r}", e) from None
    overrides = typed_fields(family.arch.ArchConfig, cfg.model.arch_overrides, "model.arch_overrides")
    try:
        arch = dataclasses.replace(arch, **overrides)
    except OutEffError as e:  # OPTArchConfig's value checks name the arch, not the config key
        raise with_context("model.arch_overrides", e) from None
    if cfg.data.seq_length > arch.max_position_embeddings:
        raise OutEffError(
            f"data.seq_length={cfg.data.seq_length} exceeds max_position_embeddings={arch.max_position_embeddings}"
        )
    return arch


def attention_variant(cfg: Config):
    """cfg.attention: the typed AttentionVariantConfig (parsed and validated when the config loaded)."""
    return cfg.attention


def check_model(cfg: Config) -> None:
    """Every model-defining key checked when the config is loaded, before anything is built or written:
    model.arch and model.arch_overrides (the family's ArchConfig fields), the attention variant (with
    data.seq_length for the clip_alpha form), the TP/PP layout, model.vocab_size, and megatron's
    TransformerConfig built from the arch and model.transformer_overrides (its own field names and
    checks). Builds no module. Raises OutEffError naming the bad key."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_outeff.models.family import family_of

    arch = arch_config(cfg)
    family = family_of(arch)
    variant = attention_variant(cfg)  # raises its own "attention: ..." OutEffError
    try:
        variant.clip_pair(cfg.data.seq_length)
    except ValueError as e:
        raise OutEffError(f"attention: {e}") from None
    tp, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    try:
        family.arch.check_parallel_layout(arch, tp, pp)
    except OutEffError as e:
        raise with_context("model", e) from None
    vocab = cfg.model.vocab_size
    if vocab is not None and (vocab < arch.vocab_size or vocab % tp):
        raise OutEffError(f"model.vocab_size={vocab}: expected >= the arch's {arch.vocab_size} and divisible by "
                          f"tensor_parallel={tp}")
    try:
        family.arch.transformer_config(arch, **transformer_overrides(cfg))
    except (TypeError, ValueError, AssertionError) as e:
        raise with_context("model.transformer_overrides: megatron's TransformerConfig refuses them", e) from None


def check_transformer_overrides(overrides: dict, family=None) -> dict:
    """model.transformer_overrides checked against megatron's TransformerConfig: its field names, the types a
    YAML value can have (bool, int, float, str, Literal choices, Enum member names; a Python object such as
    a callable or a torch.dtype cannot come from YAML), and no field another key owns. Returns the
    converted mapping. ``family``: model.arch's (models/family.py; default OPT), whose architecture owns
    some fields."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_outeff.models.family import DEFAULT_FAMILY, get_family

    from .config import typed_fields

    family = family or get_family(DEFAULT_FAMILY)
    from_arch = family.arch.TRANSFORMER_FIELDS_FROM_ARCH
    where = "model.transformer_overrides"
    for key in overrides:
        if key in TRANSFORMER_FIELDS_OWNED:
            raise OutEffError(f"{where}.{key}: set by {TRANSFORMER_FIELDS_OWNED[key]}, not here")
        if key in from_arch:
            arch_key = from_arch[key]
            raise OutEffError(f"{where}.{key}: " + (f"set by the architecture: use model.arch_overrides.{arch_key}"
                              if arch_key else f"fixed by the {family.label} architecture"))
    checked = typed_fields(TransformerConfig, overrides, where)
    hints = typing.get_type_hints(TransformerConfig)
    for key, value in checked.items():
        if _python_object(hints[key]):
            raise OutEffError(f"{where}.{key}={value!r}: megatron expects a Python object ({hints[key]}), "
                              "which a config value cannot be")
    return checked


def _python_object(hint) -> bool:
    """A TransformerConfig field type that no YAML value has (a callable, a torch.dtype, a context manager)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return all(a is torch.dtype or typing.get_origin(a) in (collections.abc.Callable, contextlib.AbstractContextManager)
               or a in (collections.abc.Callable, typing.Callable) for a in args)


def transformer_overrides(cfg: Config) -> dict:
    """TransformerConfig fields set by the training config (on top of the arch's): model.transformer_overrides
    (checked, converted) and what precision and model.recompute_* ask for."""
    from megatron_outeff.models.family import family_for_arch

    over = check_transformer_overrides(cfg.model.transformer_overrides, family_for_arch(cfg.model.arch))
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
    stage). Raises OutEffError for a model the config cannot build."""
    from megatron.core import parallel_state as ps

    from megatron_outeff.models.family import family_of

    pre_process = ps.is_pipeline_first_stage() if pre_process is None else pre_process
    post_process = ps.is_pipeline_last_stage() if post_process is None else post_process
    arch, variant = arch_config(cfg), attention_variant(cfg)  # each raises its own complete OutEffError
    try:
        model = family_of(arch).arch.build_model(
            arch, variant, vocab_size=cfg.model.vocab_size, params_dtype=torch.float32,
            sequence_parallel=cfg.parallel.sequence_parallel, pre_process=pre_process, post_process=post_process,
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
