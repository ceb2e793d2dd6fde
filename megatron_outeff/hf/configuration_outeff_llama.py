"""Hugging Face configuration of a Llama model with outlier-efficient attention.

transformers' ``LlamaConfig`` plus the attention variant: the fields of ``AttentionVariantConfig``
(megatron_outeff/ops/variants.py, its owner) as flat config.json keys under the same names, parsed and
validated by it (``attention_variant()`` gives the variant back); the same rule as
``OutEffOPTConfig``. Imports the project's code only through ``outeff_deps``, so an exported directory
loads it with ``trust_remote_code=True`` without megatron_outeff installed.
"""
from transformers import LlamaConfig

from .outeff_deps import AttentionVariantConfig, variant_tensors


class OutEffLlamaConfig(LlamaConfig):
    """``LlamaConfig`` plus the attention variant's fields (``AttentionVariantConfig``: softmax,
    softmax_n, clip_gamma, clip_zeta, clip_alpha, gate, gate_init_prob; its defaults).

    ``clip_alpha`` must be resolved to an explicit ``clip_gamma`` (the exporter does, with the training
    sequence length). Errors: the variant's one-line ValueError, or the gate's shape rules (``variant_tensors``).
    """

    model_type = "outeff_llama"

    def __post_init__(self, **kwargs):
        variant = AttentionVariantConfig.from_fields(kwargs, pop=True)
        super().__post_init__(**kwargs)
        variant.clip_pair()  # an unresolved clip_alpha is refused here
        self.variant_tensors(variant)  # the gate's shape rules
        for name, value in variant.to_dict().items():
            setattr(self, name, value)

    def attention_variant(self) -> AttentionVariantConfig:
        return AttentionVariantConfig.from_fields(vars(self))

    def variant_tensors(self, variant=None):
        """The tensors the variant adds to each attention layer (``ops.variants.variant_tensors``; their ``hf``
        names are inside ``self_attn``). Llama's q/k/v projections have no bias, so neither has the elementwise
        gate (sigmoid(x W^T): Qiu et al.'s form and megatron's linear_qkv rows without a bias)."""
        variant = self.attention_variant() if variant is None else variant
        return variant_tensors(variant, num_heads=self.num_attention_heads, head_dim=self.head_dim,
                               hidden_size=self.hidden_size, qkv_bias=bool(getattr(self, "attention_bias", False)))


__all__ = ["OutEffLlamaConfig"]
