"""What the model families' builders share (models/opt.py, models/llama.py; the registry: models/family.py):
the parallel layout, the vocabulary padding, the architecture configs' parsing and value checks, the
megatron TransformerConfig settings no family decides (layout, dtypes, CUDA-only fusions off), and
the checks before a model is built. Imports megatron only inside functions. Errors: one-line OutEffError.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Optional

import torch

from megatron_outeff.errors import OutEffError

from .model_yaml import arch_from_dict  # re-exported: the ArchConfigs' parser


def parallel_sizes() -> tuple[int, int]:
    """(TP, PP) of megatron's parallel_state, (1, 1) when it is not initialised."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 1, 1
    return ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()


def padded_vocab_size(vocab_size: int, tp_size: int, divisible_by: int = 8) -> int:
    """Vocabulary rows in the megatron model: megatron's VocabParallelEmbedding needs a multiple of
    the TP size; multiples of 8 per rank keep GEMM shapes aligned. OPT's 50272 needs no padding for
    TP <= 4. Padding rows are zero on import from Hugging Face and dropped on export."""
    m = divisible_by * tp_size
    return int(math.ceil(vocab_size / m) * m)


def as_variant(variant):
    """None stays None (megatron's own local attention); a mapping becomes an AttentionVariantConfig."""
    if variant is None:
        return None
    from megatron_outeff.ops.variants import AttentionVariantConfig

    if isinstance(variant, AttentionVariantConfig):
        return variant
    if isinstance(variant, dict):
        return AttentionVariantConfig.from_dict(variant)
    raise OutEffError(f"variant={variant!r}: expected None, an AttentionVariantConfig or a mapping of its fields")


def check_arch_values(
    arch, *, positive_ints: Iterable[str], probabilities: Iterable[str] = (), positive: Iterable[str] = ()
) -> None:
    """One-line OutEffError (naming the architecture) for a field that is not a positive integer, not a
    probability in [0, 1), or not > 0."""
    for f in positive_ints:
        v = getattr(arch, f)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise OutEffError(f"{arch.name}: {f}={v!r}: expected a positive integer")
    for f in probabilities:
        v = getattr(arch, f)
        if not 0.0 <= float(v) < 1.0:
            raise OutEffError(f"{arch.name}: {f}={v!r}: expected a probability in [0, 1)")
    for f in positive:
        if not float(getattr(arch, f)) > 0:
            raise OutEffError(f"{arch.name}: {f}={getattr(arch, f)!r}: expected > 0")


# The sizes every family's architecture has, each a positive integer (check_arch_sizes).
ARCH_SIZE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "vocab_size",
    "max_position_embeddings",
)


# The TransformerConfig fields every family sets from its architecture: megatron's name -> the arch field that
# sets it, or None where the family fixes (or derives) the value; a family's TRANSFORMER_FIELDS_FROM_ARCH adds
# its own (family_transformer_config).
COMMON_TRANSFORMER_FIELDS = {
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "ffn_hidden_size": "ffn_hidden_size",
    "layernorm_epsilon": "layernorm_epsilon",
    "hidden_dropout": "hidden_dropout",
    "attention_dropout": "attention_dropout",
    "init_method_std": "init_method_std",
    "output_layer_init_method": "scaled_output_layer_init",
    "kv_channels": None,
    "gated_linear_unit": None,
    "add_bias_linear": None,
    "add_qkv_bias": None,
    "normalization": None,
    "apply_residual_connection_post_layernorm": None,
}


class ArchConfigBase:
    """What every family's architecture dataclass (OPTArchConfig, LlamaArchConfig) offers beyond its fields:
    the head width, parsing from a mapping (``arch_from_dict``) and the mapping back."""

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict, source: str = "arch"):
        return arch_from_dict(cls, d, source)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_arch_sizes(arch, extra_positive_ints: Iterable[str] = ()) -> None:
    """One-line OutEffError unless the sizes (ARCH_SIZE_FIELDS and ``extra_positive_ints``) are positive
    integers and the attention heads divide the hidden size."""
    check_arch_values(arch, positive_ints=ARCH_SIZE_FIELDS + tuple(extra_positive_ints))
    if arch.hidden_size % arch.num_attention_heads != 0:
        raise OutEffError(
            f"{arch.name}: hidden_size={arch.hidden_size} is not divisible by "
            f"num_attention_heads={arch.num_attention_heads}"
        )


def check_layout_divides(arch, tp_size: int, pp_size: int, tp_split: Iterable[tuple[str, int]]) -> None:
    """One-line OutEffError unless the TP size divides every (field, value) of ``tp_split`` (what megatron
    splits across tensor-parallel ranks) and the PP size the layers."""
    for field, value in tp_split:
        if value % tp_size != 0:
            raise OutEffError(f"{arch.name}: {field}={value} is not divisible by tensor parallel size {tp_size}")
    if arch.num_layers % pp_size != 0:
        raise OutEffError(
            f"{arch.name}: num_layers={arch.num_layers} is not divisible by pipeline parallel size {pp_size}"
        )


def family_transformer_config(arch, fields_from_arch: dict, fixed: dict, overrides: dict, variant=None):
    """megatron_transformer_config of a family: the TransformerConfig fields the architecture sets
    (``fields_from_arch``: megatron's name -> the arch field), then what the family fixes or derives
    (``fixed``, which wins), and megatron's scaled output-layer init unless ``arch.scaled_output_layer_init``
    is False (then every linear uses ``init_method_std``)."""
    from megatron.core.utils import init_method_normal

    kw: dict[str, Any] = {
        name: getattr(arch, ours)
        for name, ours in fields_from_arch.items()
        if ours and name not in fixed and name != "output_layer_init_method"
    }
    kw.update(fixed)
    if not arch.scaled_output_layer_init:
        kw["output_layer_init_method"] = init_method_normal(arch.init_method_std)
    return megatron_transformer_config(kw, overrides, variant)


def local_block_submodules(config, norm, replace: tuple = (), **layer_spec_kwargs):
    """This pipeline stage's TransformerBlockSubmodules of megatron's own local (non-TE) layer, i.e. its own
    DotProductAttention, with ``norm`` (an SP-capable torch norm) wherever megatron would pick
    WrappedTorchNorm (or a class of ``replace``), and as the final norm."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = get_gpt_layer_local_spec(**layer_spec_kwargs)
    ls = layer.submodules
    swap = {a: norm for a in ("input_layernorm", "pre_mlp_layernorm") if getattr(ls, a) in (WrappedTorchNorm, *replace)}
    layer = dataclasses.replace(layer, submodules=dataclasses.replace(ls, **swap))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=norm)


def megatron_transformer_config(arch_kwargs: dict, overrides: dict, variant=None):
    """megatron-core's TransformerConfig from a family's architecture settings (``arch_kwargs``) plus what
    no family decides: the TP/PP layout of parallel_state, the dtype (``overrides['params_dtype']``,
    default fp32), CPU initialisation without CUDA, every fusion flag off (the fused kernels are
    CUDA-only; callers on GPU may switch them on through ``overrides``) and what megatron sizes the
    attention variant's parameters by (``megatron.variant.transformer_config_fields``:
    ``attention_output_gate`` for the elementwise gate's rows in linear_qkv; the variant itself travels in
    the layer spec). ``overrides`` must be TransformerConfig fields."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    overrides = dict(overrides)
    tp, pp = parallel_sizes()
    params_dtype = overrides.pop("params_dtype", torch.float32)
    kw: dict[str, Any] = dict(arch_kwargs)
    kw.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
        cuda_graph_scope=[],  # megatron's spelling of its default ("full" warns as deprecated)
    )
    variant = as_variant(variant)
    if variant is not None:
        from megatron_outeff.megatron.variant import transformer_config_fields

        kw.update(transformer_config_fields(variant))
    unknown = sorted(k for k in overrides if k not in {f.name for f in dataclasses.fields(TransformerConfig)})
    if unknown:
        raise OutEffError(f"transformer overrides {unknown}: not TransformerConfig fields")
    kw.update(overrides)
    return TransformerConfig(**kw)


def prepare_build(
    arch,
    check_parallel_layout,
    variant,
    *,
    vocab_size: Optional[int],
    sequence_parallel: bool,
    pre_process: Optional[bool],
    post_process: Optional[bool],
):
    """The checks and defaults before building this rank's model: the layout against ``arch``, megatron's
    CPU patches, the variant parsed, SP off without TP, the vocabulary rows (default padded for TP) and
    this rank's pipeline role. Returns (variant, sequence_parallel, vocab_size, pre_process, post_process)."""
    from megatron.core import parallel_state as ps

    from megatron_outeff.megatron.cpu_support import apply_cpu_patches

    tp, pp = parallel_sizes()
    check_parallel_layout(arch, tp, pp)
    if sequence_parallel and tp == 1:
        sequence_parallel = False  # megatron rejects SP without TP; it would be a no-op anyway
    variant = as_variant(variant)
    apply_cpu_patches()
    if vocab_size is None:
        vocab_size = padded_vocab_size(arch.vocab_size, tp)
    elif vocab_size < arch.vocab_size or vocab_size % tp != 0:
        raise OutEffError(
            f"vocab_size={vocab_size}: expected >= {arch.vocab_size} and divisible by tensor parallel size {tp}"
        )
    initialized = ps.model_parallel_is_initialized()
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage() if initialized else True
    if post_process is None:
        post_process = ps.is_pipeline_last_stage() if initialized else True
    return variant, sequence_parallel, vocab_size, pre_process, post_process


def build_family_model(
    arch,
    variant=None,
    *,
    vocab_size: Optional[int] = None,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    seq_length: Optional[int] = None,
    **transformer_overrides,
):
    """A family's megatron-core model for this rank's (TP, PP) position in megatron's parallel_state (the body
    of ``build_opt_model`` / ``build_llama_model``): ``arch``'s family's arch module (models/family.py)
    gives its ``check_parallel_layout``, ``transformer_config``, ``block_spec`` and ``construct_model``.

    vocab_size: rows of the (TP-split) embedding; default ``padded_vocab_size(arch.vocab_size, tp)``.
    variant: None (megatron's own attention) or an AttentionVariantConfig / mapping of its fields
    (megatron_outeff's layer spec: softmax_1, softmax_n, learnable offsets, clipping, gates).
    pre_process / post_process: default to this rank being the first / last pipeline stage.
    seq_length: training sequence length; needed only by clipped variants in the clip_alpha form.
    ``transformer_overrides``: TransformerConfig fields (one-line OutEffError for any other name).
    """
    from megatron_outeff.megatron.cpu_support import cpu_model_construction

    from .family import family_of

    family = family_of(arch).arch
    variant, sequence_parallel, vocab_size, pre_process, post_process = prepare_build(
        arch,
        family.check_parallel_layout,
        variant,
        vocab_size=vocab_size,
        sequence_parallel=sequence_parallel,
        pre_process=pre_process,
        post_process=post_process,
    )
    config = family.transformer_config(
        arch, variant, params_dtype=params_dtype, sequence_parallel=sequence_parallel, **transformer_overrides
    )
    block_spec = family.block_spec(config, arch, variant, seq_length)
    with cpu_model_construction():
        model = family.construct_model(
            config, block_spec, arch, vocab_size=vocab_size, pre_process=pre_process, post_process=post_process
        )
    if params_dtype != torch.float32:
        # megatron creates its linears/embeddings in params_dtype but torch norms (and OPT's position
        # table) in fp32; a mixed model fails in its first matmul unless wrapped in Float16Module. Cast
        # once here (what Float16Module does too, so wrapping stays harmless).
        model.to(params_dtype)
    return model


__all__ = [
    "ARCH_SIZE_FIELDS",
    "ArchConfigBase",
    "COMMON_TRANSFORMER_FIELDS",
    "arch_from_dict",
    "as_variant",
    "build_family_model",
    "check_arch_sizes",
    "check_arch_values",
    "check_layout_divides",
    "family_transformer_config",
    "local_block_submodules",
    "megatron_transformer_config",
    "padded_vocab_size",
    "parallel_sizes",
    "prepare_build",
]
