"""The family-independent part of the remote code (OPT: ``modeling_outeff_opt.py``, Llama:
``modeling_outeff_llama.py``): the variant's fields on a config (``VariantConfigMixin``), the variant's
tensors on an attention module, its output gates, their initialisation (``VariantPreTrainedMixin``), and
the eager-mask conversion. A model family's attention computes q, k, v its own way (OPT's scaled queries,
Llama's RoPE and grouped-query heads) and uses these for the rest.

Imports the project's code only through ``outeff_deps`` (an exported directory ships this file beside it:
transformers copies a modeling file's relative imports).
"""

import torch
from torch import nn

from .outeff_deps import (
    AttentionVariantConfig,
    apply_output_gate,
    causal_mask,
    elementwise_gate,
    head_gate,
    variant_tensors,
)


class OutEffHeadGate(nn.Module):
    """Per-head attention gate (``head_gate``): [batch, seq, d_model] -> [batch, seq, heads] in (0, 1), fp32.
    Its parameters: the variant's ``gate.<name>`` tensors (``variant_tensors``)."""

    def __init__(self, kind: str, tensors):
        super().__init__()
        self.kind = kind
        self.variant_params = tuple((t.name, t) for t in tensors)  # initialised by init_variant_params
        for t in tensors:
            self.register_parameter(t.name, nn.Parameter(torch.empty(t.shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return head_gate(x, self.kind, dict(self.named_parameters(recurse=False)))


def masked_out(attention_mask, bsz: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """transformers' eager 4D mask (bool True = attend, or additive float; None: causal) -> bool, True =
    masked out (the reference softmax's convention)."""
    if attention_mask is None:
        return causal_mask(q_len, kv_len, device).view(1, 1, q_len, kv_len)
    if attention_mask.dim() != 4:
        raise ValueError(
            f"attention mask of shape {tuple(attention_mask.shape)}: expected a 4D mask from the eager path"
        )
    mask = attention_mask[:, :, :, :kv_len]
    if mask.dtype == torch.bool:
        return ~mask
    masked = mask <= torch.finfo(mask.dtype).min / 2
    if not torch.all(masked | (mask == 0)):
        raise ValueError("additive attention bias other than 0 / -inf is not supported by outeff attention")
    return masked


def install_variant_tensors(module: nn.Module, variant, tensors) -> None:
    """Create the variant's tensors (``variant_tensors``; ``hf`` names relative to the attention module) on
    an attention module: its own (the learnable ``softmax_offset``; None without one), ``gate``
    (``OutEffHeadGate``, or None) and ``gate_proj`` (the elementwise gate's Linear x W^T (+ b), or None).
    Each module holding them lists (its parameter name, description) pairs in ``variant_params``."""
    by_owner = {}  # "" (the module), "gate" (OutEffHeadGate), "gate_proj" (the elementwise gate's Linear)
    for t in tensors:
        by_owner.setdefault(t.hf.rpartition(".")[0], []).append(t)
    unknown = sorted(set(by_owner) - {"", "gate", "gate_proj"})
    if unknown:
        raise ValueError(f"variant tensors under {unknown}: {type(module).__name__} holds none there")
    module.register_parameter("softmax_offset", None)  # the learnable offset, when the variant has one:
    module.variant_params = tuple((t.hf, t) for t in by_owner.get("", []))  # the module's own tensors
    for t in by_owner.get("", []):
        module.register_parameter(t.hf, nn.Parameter(torch.empty(t.shape)))
    module.gate = OutEffHeadGate(variant.gate, by_owner["gate"]) if "gate" in by_owner else None
    module.gate_proj = None
    if "gate_proj" in by_owner:
        shapes = {t.name: t.shape for t in by_owner["gate_proj"]}
        out_features, in_features = shapes["weight"]
        module.gate_proj = nn.Linear(in_features, out_features, bias="bias" in shapes)
        module.gate_proj.variant_params = tuple((t.name, t) for t in by_owner["gate_proj"])


def gate_output(module: nn.Module, attn_output: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """The attention output [b, sq, H, d] times the module's output gate (``install_variant_tensors``), both
    read from the attention's input ``hidden_states`` [b, sq, hidden]: per head (``gate``) or per head and
    channel (``gate_proj``, the elementwise gate); unchanged without one."""
    if module.gate is not None:
        attn_output = attn_output * module.gate(hidden_states).to(attn_output.dtype).unsqueeze(-1)
    if module.gate_proj is not None:
        gate = elementwise_gate(module.gate_proj(hidden_states)).view(attn_output.shape)
        attn_output = apply_output_gate(attn_output, gate)
    return attn_output


def init_variant_params(module: nn.Module, std: float) -> None:
    """The one initial value of each variant tensor a module holds (``variant_params``): its description's
    constant, or N(0, std) (the model's weight init) where it has none. For ``_init_weights``, after
    transformers' own init of the module."""
    from transformers import initialization as init

    for name, t in getattr(module, "variant_params", ()):
        param = module.get_parameter(name)
        if t.init is None:
            init.normal_(param, mean=0.0, std=std)
        else:
            init.constant_(param, t.init)


class VariantConfigMixin:
    """The attention variant on a transformers config (mixed in before the family's config class): the fields
    of ``AttentionVariantConfig`` as flat config.json keys under the same names, parsed and validated by it.
    The family says its head width and whether its q/k/v projections have a bias (``variant_head_dim``,
    ``variant_qkv_bias``)."""

    def _set_variant(self, variant) -> None:
        """Check ``variant`` for this model (an unresolved clip_alpha, the gate's shape rules) and store its
        fields; called by the family config's ``__post_init__`` after its own."""
        variant.clip_pair()  # an unresolved clip_alpha is refused here
        self.variant_tensors(variant)  # the gate's shape rules
        for name, value in variant.to_dict().items():
            setattr(self, name, value)

    def attention_variant(self) -> AttentionVariantConfig:
        return AttentionVariantConfig.from_fields(vars(self))

    def variant_tensors(self, variant=None):
        """The tensors the variant adds to each attention layer (``ops.variants.variant_tensors``; their ``hf``
        names are inside ``self_attn``)."""
        variant = self.attention_variant() if variant is None else variant
        return variant_tensors(
            variant,
            num_heads=self.num_attention_heads,
            head_dim=self.variant_head_dim(),
            hidden_size=self.hidden_size,
            qkv_bias=self.variant_qkv_bias(),
        )


class VariantPreTrainedMixin:
    """What every OutEff model class shares (mixed in first): transformers' eager attention only (no sdpa /
    flash / flex kernel computes these softmax variants), and each variant tensor's one initial value after
    transformers' own init of its module (``init_variant_params``; N(0, the config's ``variant_init_std``
    attribute) where the description has no constant)."""

    _supports_attention_backend = False
    _supports_flash_attn = False
    _supports_sdpa = False
    _supports_flex_attn = False
    variant_init_std = "initializer_range"

    def _init_weights(self, module):
        super()._init_weights(module)
        init_variant_params(module, getattr(self.config, self.variant_init_std))


__all__ = [
    "OutEffHeadGate",
    "VariantConfigMixin",
    "VariantPreTrainedMixin",
    "gate_output",
    "init_variant_params",
    "install_variant_tensors",
    "masked_out",
]
