"""Where the modeling file gets the project's attention math and ``QuantPoint`` from.

Inside the package these are megatron_outeff's own objects (one implementation of each formula,
one ``QuantPoint`` class). In an exported directory the exporter replaces this file by one that
imports verbatim copies of megatron_outeff/ops/{reference,variants}.py and
megatron_outeff/quant/points.py placed beside it (see ``export.EXPORTED_DEPS_SOURCE``), so the
directory loads without megatron_outeff installed.
"""
from megatron_outeff.ops.reference import causal_mask, outeff_softmax_reference
from megatron_outeff.ops.variants import Clip, resolve_sink
from megatron_outeff.quant.points import QuantPoint

__all__ = ["Clip", "QuantPoint", "causal_mask", "outeff_softmax_reference", "resolve_sink"]
