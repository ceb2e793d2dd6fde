"""Hugging Face Llama with outlier-efficient attention (remote code of an exported directory).

Subclasses transformers' Llama classes and replaces only the attention module, plus the decoder
layer's forward so that its two residual sums pass through ``QuantPoint`` markers (as the OPT remote
code, ``modeling_outeff_opt.py``; the variant's tensors, the gates and the mask conversion are both's:
``remote_attention.py``).

Attention per layer (transformers' Llama up to the scores: q / k / v projections, its RoPE
``apply_rotary_pos_emb``, the KV cache, ``repeat_kv`` for grouped-query attention):
    scores = (q k^T) / sqrt(d_head)       -> QuantPoint ``qk_quant``
    p      = softmax variant (sink) + mask + optional clip, in fp32
                                          -> QuantPoint ``softmax_quant``
    o      = p v                          -> QuantPoint ``pv_quant``
    o_h   *= sigmoid(G_h(x_h))            (per-head gates; x = the attention's input, after input_layernorm)
    o     *= sigmoid(x W_g^T)             (the elementwise gate, per head and channel: ``gate_proj``, a Linear
                                           without bias as Llama's projections; quantized like them in W8A8)
    out    = o_proj(o)
The variant (``config.attention_variant()``), the softmax / clip math (``outeff_softmax_reference``),
the gates and the variant's tensors (``variant_tensors``: names, shapes, initial values) are
megatron_outeff's own, imported through ``outeff_deps``, never re-implemented here. Masks: transformers' eager path only (the same
conversion as OPT's); a query row with every key masked (left padding) gives a zero attention output.

Extra parameters (state-dict keys, i = layer index; per query head, also with grouped-query attention):
``model.layers.{i}.self_attn.<hf>`` for every tensor of ``variant_tensors`` (ops/variants.py):
``softmax_offset`` [H] (learnable), ``gate.<name>`` (per-head gates), ``gate_proj.weight`` [H*d, h]
(the elementwise gate).

QuantPoints (identities in float), per decoder layer: self_attn.qk_quant, self_attn.softmax_quant,
self_attn.pv_quant, attn_residual_quant, ffn_residual_quant (5 per layer).
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    apply_rotary_pos_emb,
    repeat_kv,
)

from .configuration_outeff_llama import OutEffLlamaConfig
from .outeff_deps import Clip, QuantPoint, outeff_softmax_reference, resolve_sink
from .remote_attention import VariantPreTrainedMixin, gate_output, install_variant_tensors, masked_out

QUANT_POINTS_PER_LAYER = 5


class OutEffLlamaAttention(LlamaAttention):
    """Llama attention (RoPE, grouped-query) with a sink softmax variant, optional clipping and an
    optional output gate (per head or elementwise)."""

    def __init__(self, config: OutEffLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        self.variant = config.attention_variant()
        self.clip = Clip.parse(self.variant.clip_pair())
        self.variant_tensors = config.variant_tensors(self.variant)  # names relative to this module (``hf``)
        install_variant_tensors(self, self.variant, self.variant_tensors)  # softmax_offset, gate, gate_proj
        self.qk_quant = QuantPoint()
        self.softmax_quant = QuantPoint()
        self.pv_quant = QuantPoint()

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, H, sq, d]
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, G, sq, d]
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        key_states = repeat_kv(key_states, self.num_key_value_groups)  # [b, H, sk, d]
        value_states = repeat_kv(value_states, self.num_key_value_groups)
        q_len, kv_len = query_states.shape[2], key_states.shape[2]

        scores = self.qk_quant(torch.matmul(query_states, key_states.transpose(2, 3)) * self.scaling)
        masked = masked_out(attention_mask, input_shape[0], q_len, kv_len, scores.device)
        sink = resolve_sink(
            **self.variant.softmax_args(), offset=self.softmax_offset, num_heads=self.num_heads, device=scores.device
        )
        probs = outeff_softmax_reference(scores, scale=1.0, sink=sink, mask=masked, clip=self.clip)
        probs = self.softmax_quant(probs.to(value_states.dtype))
        probs_d = nn.functional.dropout(probs, p=self.attention_dropout, training=self.training)
        attn_output = self.pv_quant(torch.matmul(probs_d, value_states)).transpose(1, 2)  # [b, sq, H, d]
        attn_output = gate_output(self, attn_output, hidden_states)
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, probs


class OutEffLlamaDecoderLayer(LlamaDecoderLayer):
    """Llama decoder layer with ``OutEffLlamaAttention`` and QuantPoints on both residual sums."""

    def __init__(self, config: OutEffLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = OutEffLlamaAttention(config=config, layer_idx=layer_idx)
        self.attn_residual_quant = QuantPoint()
        self.ffn_residual_quant = QuantPoint()

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        use_cache=False,
        position_embeddings=None,
        **kwargs,
    ):
        # Same computation as LlamaDecoderLayer.forward; only the QuantPoints are added.
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = self.attn_residual_quant(residual + hidden_states)
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return self.ffn_residual_quant(residual + hidden_states)


class _OutEffLlamaPreTrained(VariantPreTrainedMixin):
    """Class attributes and weight init shared by the OutEff Llama model classes (mixed in first): eager
    attention only and the variant tensors' initial values (``VariantPreTrainedMixin``; std initializer_range)."""

    config_class = OutEffLlamaConfig
    _no_split_modules = ["OutEffLlamaDecoderLayer"]


# As in the OPT remote code: transformers' constructor builds its parts under no_init_weights, the OutEff
# parts are swapped in, and the closing post_init() initialises the final module tree once.


class OutEffLlamaModel(_OutEffLlamaPreTrained, LlamaModel):
    def __init__(self, config: OutEffLlamaConfig):
        with init.no_init_weights():
            super().__init__(config)
            self.layers = nn.ModuleList([OutEffLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()


class OutEffLlamaForCausalLM(_OutEffLlamaPreTrained, LlamaForCausalLM):
    def __init__(self, config: OutEffLlamaConfig):
        with init.no_init_weights():
            super().__init__(config)
            self.model = OutEffLlamaModel(config)
        self.post_init()


OutEffLlamaConfig.register_for_auto_class()
OutEffLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "OutEffLlamaAttention",
    "OutEffLlamaDecoderLayer",
    "OutEffLlamaForCausalLM",
    "OutEffLlamaModel",
    "QUANT_POINTS_PER_LAYER",
]
