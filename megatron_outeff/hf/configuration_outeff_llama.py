"""Hugging Face configuration of a Llama model with outlier-efficient attention.

transformers' ``LlamaConfig`` plus the attention variant: the fields of ``AttentionVariantConfig``
(megatron_outeff/ops/variants.py, its owner) as flat config.json keys under the same names, parsed and
validated by it (``attention_variant()`` gives the variant back); the same rule as ``OutEffOPTConfig``.
Imports the project's code only through ``outeff_deps`` (and ``remote_attention``, which does the same),
so an exported directory loads it with ``trust_remote_code=True`` without megatron_outeff installed.
"""

from transformers import LlamaConfig

from .outeff_deps import AttentionVariantConfig
from .remote_attention import VariantConfigMixin


class OutEffLlamaConfig(VariantConfigMixin, LlamaConfig):
    """``LlamaConfig`` plus the attention variant's fields (``AttentionVariantConfig``: softmax,
    softmax_n, clip_gamma, clip_zeta, clip_alpha, gate, gate_init_prob; its defaults): ``VariantConfigMixin``.

    ``clip_alpha`` must be resolved to an explicit ``clip_gamma`` (the exporter does, with the training
    sequence length). Llama's q/k/v projections have no bias, so neither has the elementwise gate
    (sigmoid(x W^T): Qiu et al.'s form and megatron's linear_qkv rows without a bias). Errors: the
    variant's one-line ValueError, or the gate's shape rules (``variant_tensors``).
    """

    model_type = "outeff_llama"

    def __post_init__(self, **kwargs):
        variant = AttentionVariantConfig.from_fields(kwargs, pop=True)
        super().__post_init__(**kwargs)
        self._set_variant(variant)

    def variant_head_dim(self) -> int:
        return self.head_dim

    def variant_qkv_bias(self) -> bool:
        return bool(getattr(self, "attention_bias", False))


__all__ = ["OutEffLlamaConfig"]
