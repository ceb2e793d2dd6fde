"""Outlier-efficient attention operators. Knows nothing of Megatron or DeepSpeed.

Public API:
    outeff_attention(q, k, v, *, softmax, n, offset, clip, gate, causal, key_padding_mask, mask, scale, dropout_p, impl)
    outeff_attention_probs(q, k, *, softmax, n, offset, causal, key_padding_mask, mask, scale)   # monitoring
    outeff_softmax_reference(scores, *, scale, sink, mask, clip)   # plain PyTorch row softmax
    sdpa_backend_record(reset=False)   # which of torch's fused kernels the sink path ran (sdpa_attention.py)
    AttentionVariantConfig, SOFTMAX_VARIANTS, GATE_VARIANTS, resolve_sink, Clip   (variants.py)
    gate_parameter_shapes, gate_initial_value, head_gate                             (gate.py)
"""
from .attention import outeff_attention, outeff_attention_probs, triton_runs_on
from .gate import gate_initial_value, gate_parameter_shapes, head_gate
from .reference import causal_mask, outeff_attention_reference, outeff_softmax_reference
from .sdpa_attention import sdpa_backend_record
from .variants import GATE_VARIANTS, IMPLEMENTATIONS, SOFTMAX_VARIANTS, AttentionVariantConfig, Clip, resolve_sink

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
    "gate_initial_value",
    "gate_parameter_shapes",
    "head_gate",
    "sdpa_backend_record",
]
