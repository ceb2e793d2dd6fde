"""Where the Hugging Face remote code gets the project's attention variant, attention math, gate and
``QuantPoint`` from: one implementation of each, never re-implemented in the remote code.

Inside the package these imports are megatron_outeff's own modules. An exported directory holds
this file with each import made relative to a verbatim copy of the module placed beside it
(``export.exported_sources``), so the directory loads without megatron_outeff installed.
"""

from megatron_outeff.ops.gate import apply_output_gate, elementwise_gate, head_gate
from megatron_outeff.ops.reference import causal_mask, outeff_softmax_reference
from megatron_outeff.ops.variants import AttentionVariantConfig, Clip, resolve_sink, variant_tensors
from megatron_outeff.quant.points import QuantPoint

__all__ = [
    "AttentionVariantConfig",
    "Clip",
    "QuantPoint",
    "apply_output_gate",
    "causal_mask",
    "elementwise_gate",
    "head_gate",
    "outeff_softmax_reference",
    "resolve_sink",
    "variant_tensors",
]
