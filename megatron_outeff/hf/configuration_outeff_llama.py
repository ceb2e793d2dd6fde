"""Hugging Face configuration of a Llama model with outlier-efficient attention.

transformers' ``LlamaConfig`` plus the attention variant: the fields of ``AttentionVariantConfig``
(megatron_outeff/ops/variants.py, its owner) as flat config.json keys under the same names, parsed and
validated by it (``attention_variant()`` gives the variant back); the same rule as
``OutEffOPTConfig``. Imports the project's code only through ``outeff_deps``, so an exported directory
loads it with ``trust_remote_code=True`` without megatron_outeff installed.
"""
from transformers import LlamaConfig

from .outeff_deps import AttentionVariantConfig, gate_parameter_shapes


class OutEffLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus the attention variant's fields (``AttentionVariantConfig``: softmax,
    softmax_n, clip_gamma, clip_zeta, clip_alpha, gate, gate_init_prob; its defaults).

    ``clip_alpha`` must be resolved to an explicit ``clip_gamma`` (the exporter does, with the training
    sequence length). Errors: the variant's one-line ValueError, or the gate's shape rules (``ops.gate``).
    """

    model_type = "outeff_llama"

    def __post_init__(self, **kwargs):
        variant = AttentionVariantConfig.from_fields(kwargs, pop=True)
        super().__post_init__(**kwargs)
        variant.clip_pair()  # an unresolved clip_alpha is refused here
        if variant.gated:
            gate_parameter_shapes(variant.gate, self.num_attention_heads, self.head_dim, self.hidden_size)
        for name, value in variant.to_dict().items():
            setattr(self, name, value)

    def attention_variant(self) -> AttentionVariantConfig:
        return AttentionVariantConfig.from_fields(vars(self))


__all__ = ["OutEffLlamaConfig"]
