"""Hugging Face OPT with outlier-efficient attention (remote code of an exported directory).

Subclasses transformers' OPT classes and replaces only the attention module, plus the decoder
layer's forward so that its two residual sums pass through ``QuantPoint`` markers.

Attention per layer (q already scaled by 1/sqrt(d_head), as in OPT):
    scores = q k^T                       -> QuantPoint ``qk_quant``
    p      = softmax variant (sink) + mask + optional clip, in fp32
                                          -> QuantPoint ``softmax_quant``
    o      = p v                          -> QuantPoint ``pv_quant``
    o_h   *= sigmoid(G_h(x_h))            (per-head gates; x = the attention layer's input)
    o     *= sigmoid(gate_proj(x))        (the elementwise gate, per head and channel; a Linear, quantized
                                           like q/k/v/out_proj by both W8A8 paths)
    out    = out_proj(o)
The variant (``config.attention_variant()``), the softmax/clip math (``outeff_softmax_reference``),
the gate (``head_gate``) and the variant's tensors (``variant_tensors``: names, shapes, initial values)
are megatron_outeff's own, imported through ``outeff_deps``, never re-implemented here; the modules
holding the variant's tensors, the gates' application and the mask conversion are ``remote_attention.py``
(shared with the Llama remote code).

Masks: the model runs transformers' "eager" mask path (sdpa/flash/flex are declared unsupported,
since none of them computes these variants), so each layer receives OPT's causal + padding mask
as a 4D additive float mask (0 = attend, dtype-min = masked) or a 4D bool mask (True = attend);
both are turned into the boolean "True = masked out" mask of the reference softmax. A query row
with every key masked (a left-padding position) yields a zero attention output.

Extra parameters (state-dict keys, i = layer index): ``model.decoder.layers.{i}.self_attn.<hf>`` for
every tensor of ``variant_tensors`` (ops/variants.py): ``softmax_offset`` [H] (learnable), ``gate.<name>``
(per-head gates), ``gate_proj.weight`` [H*d, h] / ``gate_proj.bias`` [H*d] (elementwise gate).

QuantPoints (identities in float), per decoder layer: self_attn.qk_quant, self_attn.softmax_quant,
self_attn.pv_quant, attn_residual_quant, ffn_residual_quant (5 per layer).
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.models.opt.modeling_opt import OPTAttention, OPTDecoder, OPTDecoderLayer, OPTForCausalLM, OPTModel

from .configuration_outeff_opt import OutEffOPTConfig
from .outeff_deps import Clip, QuantPoint, outeff_softmax_reference, resolve_sink
from .remote_attention import OutEffHeadGate, VariantPreTrainedMixin, gate_output, install_variant_tensors
from .remote_attention import masked_out as _masked_out

QUANT_POINTS_PER_LAYER = 5


class OutEffOPTAttention(OPTAttention):
    """OPT attention with a sink softmax variant, optional clipping and an optional output gate (per head or
    elementwise)."""

    def __init__(self, config: OutEffOPTConfig, layer_idx: int | None = None, **kwargs):
        super().__init__(config, layer_idx=layer_idx, **kwargs)
        self.variant = config.attention_variant()
        self.clip = Clip.parse(self.variant.clip_pair())
        self.variant_tensors = config.variant_tensors(self.variant)  # names relative to this module (``hf``)
        # softmax_offset, gate (per head), gate_proj (the elementwise gate's Linear x W^T + b): remote_attention.py
        install_variant_tensors(self, self.variant, self.variant_tensors)
        self.qk_quant = QuantPoint()
        self.softmax_quant = QuantPoint()
        self.pv_quant = QuantPoint()

    def forward(self, hidden_states, past_key_values=None, attention_mask=None, output_attentions=False, **kwargs):
        bsz, tgt_len, _ = hidden_states.size()
        query_states = self.q_proj(hidden_states) * self.scaling
        query_states = query_states.view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        kv_len = key_states.shape[2]

        scores = self.qk_quant(torch.matmul(query_states, key_states.transpose(-1, -2)))  # [b, H, sq, sk]
        masked = _masked_out(attention_mask, bsz, tgt_len, kv_len, scores.device)
        sink = resolve_sink(
            **self.variant.softmax_args(), offset=self.softmax_offset, num_heads=self.num_heads, device=scores.device
        )
        probs = outeff_softmax_reference(scores, scale=1.0, sink=sink, mask=masked, clip=self.clip)
        probs = self.softmax_quant(probs.to(value_states.dtype))
        probs_d = nn.functional.dropout(probs, p=self.dropout, training=self.training)
        attn_output = self.pv_quant(torch.matmul(probs_d, value_states))  # [b, H, sq, d]
        attn_output = gate_output(self, attn_output.transpose(1, 2), hidden_states)  # [b, sq, H, d]
        attn_output = self.out_proj(attn_output.reshape(bsz, tgt_len, -1).contiguous())
        return attn_output, probs


class OutEffOPTDecoderLayer(OPTDecoderLayer):
    """OPT decoder layer with ``OutEffOPTAttention`` and QuantPoints on both residual sums."""

    def __init__(self, config: OutEffOPTConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.self_attn = OutEffOPTAttention(config=config, layer_idx=layer_idx)
        self.attn_residual_quant = QuantPoint()
        self.ffn_residual_quant = QuantPoint()

    def forward(
        self, hidden_states, attention_mask=None, past_key_values=None, use_cache=False, position_ids=None, **kwargs
    ):
        # Same computation as OPTDecoderLayer.forward; only the QuantPoints are added.
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            past_key_values=past_key_values,
            position_ids=position_ids,
            attention_mask=attention_mask,
            **kwargs,
        )
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.attn_residual_quant(residual + hidden_states)
        if not self.do_layer_norm_before:
            hidden_states = self.self_attn_layer_norm(hidden_states)

        hidden_states_shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_states.size(-1))
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        hidden_states = self.fc2(self.activation_fn(self.fc1(hidden_states)))
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.ffn_residual_quant(residual + hidden_states).view(hidden_states_shape)
        if not self.do_layer_norm_before:
            hidden_states = self.final_layer_norm(hidden_states)
        return hidden_states


class _OutEffOPTPreTrained(VariantPreTrainedMixin):
    """Class attributes and weight init shared by the OutEff OPT model classes (mixed in first): eager attention
    only and the variant tensors' initial values (``VariantPreTrainedMixin``), OPT's init std."""

    config_class = OutEffOPTConfig
    _no_split_modules = ["OutEffOPTDecoderLayer"]
    variant_init_std = "init_std"


# Each constructor lets transformers' OPT constructor build its parts, then swaps in the OutEff part.
# The parent's parts are built under no_init_weights (no torch or transformers init work, nothing tied);
# the closing post_init() initialises (and ties) the final module tree once. Nested inside another
# no_init_weights block, that post_init is a no-op too and the outermost one does the work.


class OutEffOPTDecoder(_OutEffOPTPreTrained, OPTDecoder):
    def __init__(self, config: OutEffOPTConfig):
        with init.no_init_weights():
            super().__init__(config)
            self.layers = nn.ModuleList(
                [OutEffOPTDecoderLayer(config, layer_idx=i) for i in range(config.num_hidden_layers)]
            )
        self.post_init()


class OutEffOPTModel(_OutEffOPTPreTrained, OPTModel):
    def __init__(self, config: OutEffOPTConfig):
        with init.no_init_weights():
            super().__init__(config)
            self.decoder = OutEffOPTDecoder(config)
        self.post_init()


class OutEffOPTForCausalLM(_OutEffOPTPreTrained, OPTForCausalLM):
    def __init__(self, config: OutEffOPTConfig):
        with init.no_init_weights():
            super().__init__(config)
            self.model = OutEffOPTModel(config)
        self.post_init()


OutEffOPTConfig.register_for_auto_class()
OutEffOPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "OutEffHeadGate",
    "OutEffOPTAttention",
    "OutEffOPTDecoder",
    "OutEffOPTDecoderLayer",
    "OutEffOPTForCausalLM",
    "OutEffOPTModel",
    "QUANT_POINTS_PER_LAYER",
]
