"""The attention variant in megatron-core terms: the one translator to and from megatron's
``TransformerConfig.softmax_type``.

The variant itself (``AttentionVariantConfig``: softmax x clip x gate, its fields, validation and
dict form) is owned by ``megatron_outeff.ops.variants`` and re-exported here. megatron-core 0.16.1's
``softmax_type: Literal['vanilla', 'off-by-one', 'learnable']`` maps onto our softmax names:
'off-by-one' is Softmax_1 (a zero offset megatron keeps as a non-trainable tensor), 'learnable' our
learnable offset (same parameter name, ``softmax_offset``). Imports nothing of megatron.
"""
from __future__ import annotations

from typing import Literal, Optional, Tuple, get_args

from megatron_outeff.ops.variants import AttentionVariantConfig

MegatronSoftmaxType = Literal["vanilla", "off-by-one", "learnable"]
MEGATRON_SOFTMAX_TYPES: Tuple[str, ...] = get_args(MegatronSoftmaxType)

# megatron softmax_type -> our softmax name
_FROM_MEGATRON = {"vanilla": "vanilla", "off-by-one": "softmax1", "learnable": "learnable"}


def from_megatron_softmax_type(softmax_type: str, **fields) -> AttentionVariantConfig:
    """The variant of megatron's ``softmax_type`` ('vanilla' | 'off-by-one' | 'learnable'), other
    fields from ``fields``. One-line ValueError for another value."""
    if softmax_type not in _FROM_MEGATRON:
        raise ValueError(f"megatron softmax_type={softmax_type!r}: expected one of {MEGATRON_SOFTMAX_TYPES}")
    return AttentionVariantConfig(softmax=_FROM_MEGATRON[softmax_type], **fields)


def megatron_softmax_type(variant: AttentionVariantConfig) -> Optional[str]:
    """The equivalent megatron-core ``softmax_type``, or None when megatron has no equivalent
    (clipped or gated variants, softmax_n with n other than 0 or 1)."""
    if variant.clipped or variant.gated:
        return None
    if variant.softmax == "softmax_n":
        return {1.0: "off-by-one", 0.0: "vanilla"}.get(variant.softmax_n)
    return {ours: theirs for theirs, ours in _FROM_MEGATRON.items()}[variant.softmax]


def variant_from_megatron(config) -> AttentionVariantConfig:
    """megatron's ``config.softmax_type`` as our variant: vanilla / off-by-one -> softmax1 / learnable."""
    return from_megatron_softmax_type(getattr(config, "softmax_type", "vanilla"))


def resolve_variant(config, variant=None) -> AttentionVariantConfig:
    """The variant a layer runs: ``variant`` (a variant or a mapping of its fields) if given, else
    megatron's ``config.softmax_type``.

    Both at once must agree: a model cannot be 'learnable' for megatron and something else for us.
    """
    megatron_type = getattr(config, "softmax_type", "vanilla")
    if variant is None:
        return from_megatron_softmax_type(megatron_type)
    if isinstance(variant, dict):
        variant = AttentionVariantConfig.from_dict(variant)
    if not isinstance(variant, AttentionVariantConfig):
        raise ValueError(f"variant={variant!r}: expected an AttentionVariantConfig, a dict or None")
    if megatron_type != "vanilla":
        implied = from_megatron_softmax_type(megatron_type).softmax
        if variant.softmax != implied:
            raise ValueError(
                f"config.softmax_type={megatron_type!r} conflicts with variant softmax={variant.softmax!r}: "
                f"set softmax_type='vanilla' and let the variant choose"
            )
    return variant


__all__ = [
    "AttentionVariantConfig",
    "MEGATRON_SOFTMAX_TYPES",
    "from_megatron_softmax_type",
    "megatron_softmax_type",
    "resolve_variant",
    "variant_from_megatron",
]
