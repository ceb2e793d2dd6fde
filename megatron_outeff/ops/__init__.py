"""Outlier-efficient attention operators. Knows nothing of Megatron or DeepSpeed.

Public API:
    outeff_attention(q, k, v, *, softmax, n, offset, clip, gate, causal, key_padding_mask, mask, scale, dropout_p, impl)
    outeff_attention_probs(q, k, *, softmax, n, offset, causal, key_padding_mask, mask, scale)   # monitoring
    outeff_softmax_reference(scores, *, scale, sink, mask, clip)   # plain PyTorch row softmax
    sdpa_backend_record(reset=False)   # which of torch's fused kernels the sink path ran (sdpa_attention.py)
    AttentionVariantConfig, SOFTMAX_VARIANTS, GATE_VARIANTS, resolve_sink, Clip   (variants.py)
    VariantTensor, variant_tensors   (variants.py: every tensor a variant adds, its names, shape, init, TP split, decay)
    gate_parameter_names, head_gate, elementwise_gate, apply_output_gate              (gate.py)
"""

from .attention import outeff_attention, outeff_attention_probs, triton_runs_on
from .gate import apply_output_gate, elementwise_gate, gate_parameter_names, head_gate
from .reference import causal_mask, outeff_attention_reference, outeff_softmax_reference
from .sdpa_attention import sdpa_backend_record
from .variants import (
    GATE_VARIANTS,
    IMPLEMENTATIONS,
    SOFTMAX_VARIANTS,
    AttentionVariantConfig,
    Clip,
    VariantTensor,
    resolve_sink,
    variant_tensors,
)

__all__ = [
    "outeff_attention",
    "outeff_attention_probs",
    "outeff_attention_reference",
    "outeff_softmax_reference",
    "causal_mask",
    "resolve_sink",
    "triton_runs_on",
    "AttentionVariantConfig",
    "Clip",
    "SOFTMAX_VARIANTS",
    "GATE_VARIANTS",
    "IMPLEMENTATIONS",
    "VariantTensor",
    "variant_tensors",
    "gate_parameter_names",
    "head_gate",
    "elementwise_gate",
    "apply_output_gate",
    "sdpa_backend_record",
]
