"""Outlier-efficient attention operators. Knows nothing of Megatron or DeepSpeed.

Public API:
    outeff_attention(q, k, v, *, softmax, n, offset, clip, gate, causal, key_padding_mask, scale, dropout_p, impl)
    outeff_softmax_reference(scores, *, scale, sink, mask, clip)   # plain PyTorch row softmax
    resolve_sink, Clip, SOFTMAX_VARIANTS
"""
from .attention import outeff_attention, triton_runs_on
from .reference import causal_mask, outeff_attention_reference, outeff_softmax_reference
from .variants import IMPLEMENTATIONS, SOFTMAX_VARIANTS, Clip, resolve_sink

__all__ = [
    "outeff_attention",
    "outeff_attention_reference",
    "outeff_softmax_reference",
    "causal_mask",
    "resolve_sink",
    "triton_runs_on",
    "Clip",
    "SOFTMAX_VARIANTS",
    "IMPLEMENTATIONS",
]
