"""The translator between megatron-core's softmax_type and our attention variant (megatron/variant.py)."""

import typing

import pytest

from megatron_outeff.megatron.variant import (
    MEGATRON_SOFTMAX_TYPES,
    from_megatron_softmax_type,
    megatron_softmax_type,
    resolve_variant,
)
from megatron_outeff.ops.variants import AttentionVariantConfig as V


def test_megatron_mapping():
    assert from_megatron_softmax_type("vanilla").softmax == "vanilla"
    assert from_megatron_softmax_type("off-by-one").softmax == "softmax1"
    assert from_megatron_softmax_type("learnable").softmax == "learnable"
    with pytest.raises(ValueError, match="softmax_type='sigmoid'"):
        from_megatron_softmax_type("sigmoid")
    assert megatron_softmax_type(V(softmax="softmax1")) == "off-by-one"
    assert megatron_softmax_type(V(softmax="softmax1", gate="linear")) is None
    assert megatron_softmax_type(V(softmax="softmax_n", softmax_n=1)) == "off-by-one"
    assert megatron_softmax_type(V(softmax="softmax_n", softmax_n=0)) == "vanilla"
    assert megatron_softmax_type(V(softmax="softmax_n", softmax_n=2)) is None


def test_translator_covers_megatron_cores_softmax_type():
    """Our list of megatron's softmax_type values is megatron-core's Literal, and each round-trips."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    theirs = typing.get_args(typing.get_type_hints(TransformerConfig)["softmax_type"])
    assert sorted(MEGATRON_SOFTMAX_TYPES) == sorted(theirs)
    for t in theirs:
        assert megatron_softmax_type(from_megatron_softmax_type(t)) == t


def test_resolve_variant_follows_or_checks_config():
    class Cfg:
        softmax_type = "learnable"

    assert resolve_variant(Cfg()) == V(softmax="learnable")
    assert resolve_variant(Cfg(), {"softmax": "learnable", "gate": "linear"}) == V(softmax="learnable", gate="linear")
    with pytest.raises(ValueError, match="conflicts"):
        resolve_variant(Cfg(), V(softmax="softmax1"))
