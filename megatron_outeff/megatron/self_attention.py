"""``OutEffSelfAttention``: megatron's ``SelfAttention`` with an attention variant and an output gate.

A thin subclass used through the layer spec (``get_outeff_layer_spec``). It adds three things:

1. The variant travels in the self-attention ModuleSpec's ``params`` (``variant``,
   ``seq_length``): megatron's per-module option mechanism. Because megatron's ``Attention``
   calls the core-attention class directly (no ModuleSpec there), this class binds the variant to
   an ``OutEffCoreAttention`` core with ``functools.partial`` before megatron builds it.
2. Gated attention (``megatron_outeff.ops.gate``): per head h, g_h = sigmoid(G_h(x_h)) with x_h
   head h's d_head-wide slice of the layer INPUT hidden state; head h's core-attention output is
   multiplied by g_h before linear_proj (passed as ``gate=`` to ``megatron_outeff.ops.outeff_attention``).
   ``OutEffHeadGate`` holds this rank's gate parameters and computes g; the forward opens
   ``core_attention.gate_scope(g)`` around megatron's unchanged forward.
3. The elementwise gate (``gate='elementwise'``, megatron-core's ``attention_output_gate``: the config says
   ``attention_output_gate=True``, so megatron's linear_qkv holds the gate rows, per query group after
   the queries, and megatron splits them off in ``get_query_key_value_tensors``). This class takes the
   gate's logits there, hands sigmoid(logits) [b, sq, heads, d] to the core attention (the ops'
   elementwise gate, ``ops.gate.apply_output_gate``) and returns no gate to megatron's forward, whose own
   multiply is then skipped: one multiply, numerically megatron's (fp32, rounded once). Its bias rows start
   at logit(gate_init_prob) (``ops.variants.variant_tensors``); its weight rows are megatron's own draw.

Tensor / sequence parallelism: a TP rank owns the gates of its own heads (parameters sharded
along the head dim, ``tensor_model_parallel=True, partition_dim=0, partition_stride=1``) and reads
the matching slice of the FULL input: ``gather_from_sequence_parallel_region`` under SP (backward:
reduce-scatter), ``copy_to_tensor_model_parallel_region`` otherwise (backward: all-reduce), so the
input gradient sums every rank's gate contribution.

Selective recompute of the core attention ('core_attn' in recompute_modules) checkpoints the gate
as an input of the recomputed region, so its gradient flows through the recomputation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_outeff.ops import elementwise_gate, head_gate
from megatron_outeff.ops.variants import GATE_FAMILIES, variant_tensor_owners

from .core_attention import (
    OutEffCoreAttention,
    check_variant_fits,
    create_variant_parameters,
    layer_variant_tensors,
    local_name,
    sharded_variant_state_dict,
)
from .variant import AttentionVariantConfig, from_megatron_softmax_type, resolve_variant


class OutEffHeadGate(MegatronModule):
    """Per-head attention gate for this TP rank's heads: hidden [s(/tp), b, d_model] -> g [b, s, heads/tp].

    The gate's math is ``megatron_outeff.ops.gate``; its parameters (names, shapes for all H heads,
    initial values, head split) are ``ops.variants.variant_tensors``' ``head_gate.*`` tensors: each rank
    stores rows [rank*H/tp, (rank+1)*H/tp) (``create_variant_parameters``); weights use config.init_method
    (megatron's weight init). The mlp gate's ``fc2_bias`` is ``bias`` here, as every gate's output bias.
    """

    def __init__(self, config: TransformerConfig, variant: AttentionVariantConfig, tp_group):
        super().__init__(config=config)
        self.kind = variant.gate
        self.tp_group = tp_group
        tp_size, tp_rank = tp_group.size(), tp_group.rank()
        heads, d_head = config.num_attention_heads, config.kv_channels
        self.heads_per_partition = heads // tp_size
        self.d_head = d_head
        self.tp_rank = tp_rank
        self.variant_tensors = create_variant_parameters(self, "head_gate", variant, config, tp_rank, tp_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.config.sequence_parallel:
            x = gather_from_sequence_parallel_region(hidden_states, group=self.tp_group)  # [s, b, d_model]
        else:
            x = copy_to_tensor_model_parallel_region(hidden_states, group=self.tp_group)
        if self.kind != "shared_linear":  # this rank's heads' slices of the input
            lo = self.tp_rank * self.heads_per_partition * self.d_head
            x = x[..., lo : lo + self.heads_per_partition * self.d_head]
        params = {t.name: getattr(self, local_name(t)) for t in self.variant_tensors}
        return head_gate(x, self.kind, params).transpose(0, 1)  # [b, s, np], fp32

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: Tuple[Tuple[int, int, int], ...] = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        """Every gate tensor is sharded by head along its ``tp_dim`` (dim 0)."""
        return sharded_variant_state_dict(self, prefix, sharded_offsets, metadata)


def _accepts_variant(builder) -> bool:
    target = builder.func if isinstance(builder, functools.partial) else builder
    return isinstance(target, type) and issubclass(target, OutEffCoreAttention)


class OutEffSelfAttention(SelfAttention):
    """megatron ``SelfAttention`` + attention variant (spec params) + output gate (per head or elementwise)."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.padding,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        variant: Optional[AttentionVariantConfig] = None,
        seq_length: Optional[int] = None,
    ):
        variant = resolve_variant(config, variant)
        tp_size = pg_collection.tp.size() if pg_collection is not None else _mpu_tp_size()
        check_variant_fits(variant, config, tp_size)  # before megatron allocates anything
        if getattr(config, "flash_decode", False):
            raise ValueError(
                "flash_decode=True: megatron's flash-decode path bypasses the core attention, so the attention variant would be lost"
            )
        core = submodules.core_attention
        if _accepts_variant(core):
            submodules = dataclasses.replace(
                submodules, core_attention=functools.partial(core, variant=variant, seq_length=seq_length)
            )
        elif variant != from_megatron_softmax_type(getattr(config, "softmax_type", "vanilla")):
            name = getattr(core, "__name__", repr(core))
            raise ValueError(
                f"core_attention={name} cannot run the attention variant {variant.describe()!r}: use OutEffCoreAttention"
            )
        super().__init__(
            config,
            submodules,
            layer_number,
            attn_mask_type=attn_mask_type,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        self.variant = variant
        family = GATE_FAMILIES.get(variant.gate, "unknown")
        if family not in (None, "head", "elementwise"):
            raise ValueError(
                f"gate={variant.gate!r}: OutEffSelfAttention builds per-head and elementwise gates, not {family!r}"
            )
        self.head_gate = OutEffHeadGate(config, variant, self.pg_collection.tp) if family == "head" else None
        self.elementwise_gate = family == "elementwise"
        if self.elementwise_gate:
            self._init_fused_gate_rows(layer_variant_tensors(variant, config))
        self._pending_gate: Optional[Tensor] = None

    @torch.no_grad()
    def _init_fused_gate_rows(self, tensors) -> None:
        """The constant initial values of the gate's rows inside linear_qkv (its bias: logit(gate_init_prob));
        megatron's rows per query group are [q (heads/group * d) | gate (heads/group * d) | k (d) | v (d)]."""
        groups = self.num_query_groups_per_partition
        rows = self.num_attention_heads_per_partition // groups * self.hidden_size_per_attention_head
        for t in tensors:
            if not t.fused_qkv or t.init is None or not self.config.perform_initialization:
                continue
            fused = self.linear_qkv.get_parameter(t.megatron.partition(".")[2])
            fused.view(groups, -1, *fused.shape[1:])[:, rows : 2 * rows].fill_(t.init)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor, *args, **kwargs):
        context = kwargs.get("inference_context", kwargs.get("inference_params", args[1] if len(args) > 1 else None))
        if context is not None and not context.is_static_batching():
            # megatron's dynamic-batching kernel (flash_decode_and_prefill) bypasses core_attention.
            raise ValueError(
                "dynamic-batching inference bypasses the core attention: the attention variant would be lost; use static batching"
            )
        if self.head_gate is None and not self.elementwise_gate:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        if self.head_gate is not None:
            self._pending_gate = self.head_gate(hidden_states)  # [b, sq, heads_per_partition], from the layer input
        try:  # the elementwise gate is set by get_query_key_value_tensors, inside megatron's forward
            with self.core_attention.gate_scope(lambda: self._pending_gate):
                return super().forward(hidden_states, attention_mask, *args, **kwargs)
        finally:
            self._pending_gate = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        """megatron's split of linear_qkv's output; with the elementwise gate, its sigmoid goes to the core
        attention ([b, sq, heads_per_partition, d], fp32) and megatron's forward gets no gate to apply."""
        qkv = super().get_query_key_value_tensors(
            hidden_states, key_value_states, output_gate=output_gate, split_qkv=split_qkv
        )
        if not output_gate:
            return qkv
        query, key, value, gate = qkv  # gate: logits [sq, b, np, hn]
        self._pending_gate = elementwise_gate(gate).transpose(0, 1)
        return query, key, value, None

    def _checkpointed_attention_forward(
        self,
        query,
        key,
        value,
        attention_mask,
        rotary_pos_emb=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        """Selective recompute: the gate is an explicit input of the checkpointed region."""
        gate = self._pending_gate
        if gate is None:
            return super()._checkpointed_attention_forward(
                query,
                key,
                value,
                attention_mask,
                rotary_pos_emb=rotary_pos_emb,
                attn_mask_type=attn_mask_type,
                attention_bias=attention_bias,
                packed_seq_params=packed_seq_params,
            )
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        mask_type = torch.tensor([mask_type.value], dtype=torch.int)

        def custom_forward(q, k, v, mask, mask_type_t, g):
            with self.core_attention.gate_scope(g):
                return self.core_attention(
                    q,
                    k,
                    v,
                    mask,
                    attn_mask_type=AttnMaskType(mask_type_t.item()),
                    attention_bias=attention_bias,
                    packed_seq_params=packed_seq_params,
                )

        return tensor_parallel.checkpoint(custom_forward, False, query, key, value, attention_mask, mask_type, gate)


def _mpu_tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def check_state_dict_fits(model: torch.nn.Module, state_dict) -> None:
    """One-line ValueError if ``state_dict`` has a variant tensor (``ops.variants.variant_tensors``: offset,
    gate) that does not fit ``model``: another variant's, or of another shape.

    torch's ``load_state_dict`` copies module by module and reports shape mismatches only at the
    end, after the other weights were overwritten; this check looks at every outlier-efficient
    tensor first. ``install_state_dict_guard`` runs it automatically on ``model.load_state_dict``.
    """
    mine = dict(model.named_parameters())
    variants = {
        name[: -len(".core_attention")]: m.variant
        for name, m in model.named_modules()
        if isinstance(m, OutEffCoreAttention)
    }
    owners = variant_tensor_owners("megatron")
    for key, value in state_dict.items():
        name = next((n for n in owners if key.endswith("." + n)), None)
        if name is None:
            continue
        param = mine.get(key)
        if param is None or getattr(param, "variant_tensor", None) is None:
            layer = next((v.describe() for p, v in variants.items() if key.startswith(p + ".")), None)
            raise ValueError(
                f"{key}: the checkpoint has a tensor of {' or '.join(owners[name])}"
                + (f" but this layer is {layer!r}" if layer else " but this model has none")
            )
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"{key}: checkpoint shape {tuple(value.shape)} does not fit this model's {tuple(param.shape)}"
            )


def install_state_dict_guard(model: torch.nn.Module) -> torch.nn.Module:
    """Run ``check_state_dict_fits`` before ``model.load_state_dict`` touches any weight. Returns model."""

    def pre_hook(module, state_dict, prefix, *args):
        stripped = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        check_state_dict_fits(model, stripped)

    model.register_load_state_dict_pre_hook(pre_hook)
    return model
