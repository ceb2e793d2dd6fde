"""The attention variant in megatron-core terms: the one translator to and from megatron's
``TransformerConfig.softmax_type`` and ``TransformerConfig.attention_output_gate``.

The variant itself (``AttentionVariantConfig``: softmax x clip x gate, its fields, validation and
dict form) is owned by ``megatron_outeff.ops.variants`` and re-exported here. megatron-core 0.16.1's
``softmax_type: Literal['vanilla', 'off-by-one', 'learnable']`` maps onto our softmax names:
'off-by-one' is Softmax_1 (a zero offset megatron keeps as a non-trainable tensor), 'learnable' our
learnable offset (same parameter name, ``softmax_offset``). ``attention_output_gate=True`` is our
``gate='elementwise'`` (same parameterization: the gate rows fused into ``linear_qkv``).

The softmax travels in the layer spec (megatron's ``softmax_type`` stays 'vanilla'); the elementwise gate
changes linear_qkv's size, which megatron's ``SelfAttention`` reads from the config, so a config that
builds it says ``attention_output_gate=True`` (``transformer_config_fields``). Imports nothing of megatron.
"""

from __future__ import annotations

from typing import Literal, Optional, Tuple, get_args

from megatron_outeff.ops.variants import AttentionVariantConfig

MegatronSoftmaxType = Literal["vanilla", "off-by-one", "learnable"]
MEGATRON_SOFTMAX_TYPES: Tuple[str, ...] = get_args(MegatronSoftmaxType)

# megatron softmax_type -> our softmax name
_FROM_MEGATRON = {"vanilla": "vanilla", "off-by-one": "softmax1", "learnable": "learnable"}
# Every name of our vocabulary -> megatron's: softmax name -> softmax_type (None: megatron has none; a function
# of n for softmax_n); gate kind -> attention_output_gate (None: megatron has no such gate). Keys are checked
# against ops.variants' Literals (tests/megatron/test_variant_vocabulary.py).
TO_MEGATRON_SOFTMAX = {
    "vanilla": "vanilla",
    "softmax1": "off-by-one",
    "learnable": "learnable",
    "softmax_n": lambda n: {1.0: "off-by-one", 0.0: "vanilla"}.get(n),
}
TO_MEGATRON_GATE = {"none": False, "elementwise": True, "linear": None, "mlp": None, "shared_linear": None}


def _to_megatron(table: dict, field: str, value):
    if value not in table:
        raise ValueError(f"{field}={value!r}: no megatron-core translation for it (megatron/variant.py)")
    return table[value]


def from_megatron_softmax_type(softmax_type: str, **fields) -> AttentionVariantConfig:
    """The variant of megatron's ``softmax_type`` ('vanilla' | 'off-by-one' | 'learnable'), other
    fields from ``fields``. One-line ValueError for another value."""
    if softmax_type not in _FROM_MEGATRON:
        raise ValueError(f"megatron softmax_type={softmax_type!r}: expected one of {MEGATRON_SOFTMAX_TYPES}")
    return AttentionVariantConfig(softmax=_FROM_MEGATRON[softmax_type], **fields)


def megatron_softmax_type(variant: AttentionVariantConfig) -> Optional[str]:
    """The equivalent megatron-core ``softmax_type``, or None when megatron has no equivalent
    (clipped or per-head gated variants, softmax_n with n other than 0 or 1). The elementwise gate is
    megatron's own (``attention_output_gate``, ``transformer_config_fields``)."""
    theirs = _to_megatron(TO_MEGATRON_SOFTMAX, "softmax", variant.softmax)
    if variant.clipped or _to_megatron(TO_MEGATRON_GATE, "gate", variant.gate) is None:
        return None
    return theirs(variant.softmax_n) if callable(theirs) else theirs


def variant_from_megatron(config) -> AttentionVariantConfig:
    """megatron's ``config.softmax_type`` (vanilla / off-by-one -> softmax1 / learnable) and
    ``config.attention_output_gate`` (-> gate 'elementwise') as our variant."""
    output_gate = bool(getattr(config, "attention_output_gate", False))
    gate = next(ours for ours, theirs in TO_MEGATRON_GATE.items() if theirs is output_gate)
    return from_megatron_softmax_type(getattr(config, "softmax_type", "vanilla"), gate=gate)


def transformer_config_fields(variant: AttentionVariantConfig) -> dict:
    """The TransformerConfig fields a model of this variant is built with: ``attention_output_gate`` (the
    elementwise gate's rows in linear_qkv). The softmax stays in the layer spec (``softmax_type`` 'vanilla')."""
    return {"attention_output_gate": bool(_to_megatron(TO_MEGATRON_GATE, "gate", variant.gate))}


def resolve_variant(config, variant=None) -> AttentionVariantConfig:
    """The variant a layer runs: ``variant`` (a variant or a mapping of its fields) if given, else
    megatron's ``config.softmax_type`` and ``config.attention_output_gate``.

    Both at once must agree: a model cannot be 'learnable' for megatron and something else for us, and
    megatron's linear_qkv holds gate rows exactly when the variant's gate is 'elementwise'.
    """
    megatron_type = getattr(config, "softmax_type", "vanilla")
    if variant is None:
        return variant_from_megatron(config)
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
    output_gate = bool(getattr(config, "attention_output_gate", False))
    if output_gate != transformer_config_fields(variant)["attention_output_gate"]:
        raise ValueError(
            f"config.attention_output_gate={output_gate} conflicts with variant gate={variant.gate!r}: the elementwise "
            f"gate's rows live in linear_qkv, so build the config with transformer_config_fields(variant) "
            f"(attention_output_gate={not output_gate})"
        )
    return variant


__all__ = [
    "AttentionVariantConfig",
    "MEGATRON_SOFTMAX_TYPES",
    "from_megatron_softmax_type",
    "megatron_softmax_type",
    "resolve_variant",
    "transformer_config_fields",
    "variant_from_megatron",
]
