"""Layer specs: megatron-core's local GPT layer with outlier-efficient attention.

    spec = get_outeff_layer_spec(AttentionVariantConfig(softmax="softmax1", gate="linear"))
    model = GPTModel(config, transformer_layer_spec=spec, ...)

``get_outeff_layer_spec`` takes megatron's own ``get_gpt_layer_local_spec()`` and replaces only
the self-attention: module ``OutEffSelfAttention`` (thin ``SelfAttention`` subclass: variant +
per-head gate) with core attention ``OutEffCoreAttention`` (drop-in ``DotProductAttention`` running
``megatron_outeff.ops.outeff_attention``). Everything else (QKV / proj ColumnParallel /
RowParallel linears, MLP, bias-dropout-add) stays megatron's.

Where the variant lives: in the self-attention ModuleSpec's ``params`` (``variant``,
``seq_length``), megatron's mechanism for per-module options; ``TransformerConfig`` is untouched,
so one config can build models of several variants and megatron's ``softmax_type`` keeps its own
meaning (``variant=None`` means "follow config.softmax_type", see ``variant.variant_from_megatron``).

Norms: without apex, megatron's local spec uses ``WrappedTorchNorm``, which refuses sequence
parallelism. ``TorchNorm`` below is the same torch LayerNorm / RMSNorm whose parameters carry the
``sequence_parallel`` attribute (so megatron's ``finalize_model_grads`` all-reduces their grads
over TP under SP); it replaces ``WrappedTorchNorm`` in the layer. The model's FINAL norm is chosen
by ``TransformerBlock`` from the layer spec unless a block spec is given: use
``get_outeff_block_spec(config, variant)`` when sequence parallel runs without apex.

With TransformerEngine installed: start from ``get_gpt_layer_with_transformer_engine_spec()`` and
apply the same replacement (``replace_self_attention(spec, variant)`` works on any TransformerLayer
spec with a ``SelfAttention``): TE's ``TELayerNormColumnParallelLinear`` / ``TERowParallelLinear``
stay, ``TEDotProductAttention`` is replaced by ``OutEffCoreAttention`` (TE's fused attention has no
clipping nor gate, and its offset support needs cuDNN >= 9.13.1). Caveat for gated variants:
the TE spec fuses the input LayerNorm into linear_qkv, so ``SelfAttention`` receives the
un-normalised residual stream; the gate must read the normalised input, so for gated variants set
``input_layernorm=TENorm`` and ``linear_qkv=TEColumnParallelLinear`` (un-fused) as well.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from .core_attention import OutEffCoreAttention
from .self_attention import OutEffSelfAttention
from .variant import AttentionVariantConfig


class TorchNorm:
    """torch LayerNorm / RMSNorm with megatron's norm constructor, usable with sequence parallelism.

    Identical maths to ``WrappedTorchNorm``; additionally sets ``param.sequence_parallel =
    config.sequence_parallel`` (under SP every TP rank normalises a different sequence shard, so the
    norm's weight/bias grads are partial sums that megatron all-reduces over TP).
    """

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        if config.layernorm_zero_centered_gamma or config.persist_layer_norm or config.memory_efficient_layer_norm:
            raise ValueError(
                "layernorm_zero_centered_gamma / persist_layer_norm / memory_efficient_layer_norm need apex or TE, not TorchNorm"
            )
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization={config.normalization!r}: TorchNorm supports LayerNorm and RMSNorm")
        for p in norm.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)
        return norm


def _torch_norm_if_wrapped(norm):
    return TorchNorm if norm is WrappedTorchNorm else norm


def replace_self_attention(
    layer_spec: ModuleSpec, variant: Optional[AttentionVariantConfig] = None, *, seq_length: Optional[int] = None
) -> ModuleSpec:
    """A copy of a TransformerLayer spec whose self-attention is OutEffSelfAttention + OutEffCoreAttention."""
    if isinstance(variant, dict):
        variant = AttentionVariantConfig.from_dict(variant)
    if variant is not None:
        variant.clip_pair(seq_length)  # the alpha form needs seq_length: fail here, before any model exists
    layer_subs = layer_spec.submodules
    attn = layer_subs.self_attention
    params = dict(attn.params or {})
    params.update(variant=variant, seq_length=seq_length)
    new_attn = ModuleSpec(
        module=OutEffSelfAttention,
        params=params,
        submodules=dataclasses.replace(attn.submodules, core_attention=OutEffCoreAttention),
    )
    new_subs = dataclasses.replace(
        layer_subs,
        self_attention=new_attn,
        input_layernorm=_torch_norm_if_wrapped(layer_subs.input_layernorm),
        pre_mlp_layernorm=_torch_norm_if_wrapped(layer_subs.pre_mlp_layernorm),
    )
    return ModuleSpec(module=layer_spec.module, params=dict(layer_spec.params or {}), submodules=new_subs)


def get_outeff_layer_spec(
    variant: Optional[AttentionVariantConfig] = None,
    *,
    qk_layernorm: bool = False,
    seq_length: Optional[int] = None,
    normalization: Optional[str] = None,
) -> ModuleSpec:
    """megatron's local GPT layer spec with outlier-efficient attention.

    variant: None follows ``config.softmax_type`` (vanilla / off-by-one / learnable).
    seq_length: the training sequence length, needed only by the clip_alpha form
    (gamma = -alpha / seq_length).
    """
    base = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    spec = replace_self_attention(base, variant, seq_length=seq_length)
    if qk_layernorm:
        subs = spec.submodules.self_attention.submodules
        subs.q_layernorm = _torch_norm_if_wrapped(subs.q_layernorm)
        subs.k_layernorm = _torch_norm_if_wrapped(subs.k_layernorm)
    return spec


def get_outeff_block_spec(
    config: TransformerConfig,
    variant: Optional[AttentionVariantConfig] = None,
    *,
    qk_layernorm: bool = False,
    seq_length: Optional[int] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Block spec (this pipeline stage's layers + final norm) for ``GPTModel(transformer_layer_spec=...)``.

    Same layers as ``get_outeff_layer_spec``; the final norm is ``TorchNorm`` when megatron would
    pick ``WrappedTorchNorm`` (no apex), so sequence parallelism works without apex / TE.
    """
    layer = get_outeff_layer_spec(
        variant, qk_layernorm=qk_layernorm, seq_length=seq_length, normalization=config.normalization
    )
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    from megatron.core.transformer import transformer_block

    return TransformerBlockSubmodules(
        layer_specs=[layer] * num_layers, layer_norm=_torch_norm_if_wrapped(transformer_block.LayerNormImpl)
    )
