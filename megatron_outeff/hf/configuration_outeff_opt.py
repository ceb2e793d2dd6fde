"""Hugging Face configuration of an OPT model with outlier-efficient attention.

transformers' ``OPTConfig`` plus the attention variant: the fields of ``AttentionVariantConfig``
(megatron_outeff/ops/variants.py, its owner) as flat config.json keys under the same names, parsed and
validated by it (``attention_variant()`` gives the variant back). Imports the project's code only through
``outeff_deps`` (and ``remote_attention``, which does the same), so an exported directory loads it with
``trust_remote_code=True`` without megatron_outeff installed.
"""

from transformers import OPTConfig

from .outeff_deps import AttentionVariantConfig
from .remote_attention import VariantConfigMixin


class OutEffOPTConfig(VariantConfigMixin, OPTConfig):
    """``OPTConfig`` plus the attention variant's fields (``AttentionVariantConfig``: softmax,
    softmax_n, clip_gamma, clip_zeta, clip_alpha, gate, gate_init_prob; its defaults): ``VariantConfigMixin``.

    ``clip_alpha`` must be resolved to an explicit ``clip_gamma`` (the exporter does, with the
    training sequence length). ``gate_init_prob`` is the value of a freshly initialised (not loaded)
    gate. Errors: the variant's one-line ValueError, or the gate's shape rules (``variant_tensors``).
    """

    model_type = "outeff_opt"

    def __post_init__(self, **kwargs):
        variant = AttentionVariantConfig.from_fields(kwargs, pop=True)
        super().__post_init__(**kwargs)
        self._set_variant(variant)

    def variant_head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def variant_qkv_bias(self) -> bool:
        return bool(getattr(self, "enable_bias", True))


__all__ = ["OutEffOPTConfig"]
