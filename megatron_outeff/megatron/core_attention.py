"""``OutEffCoreAttention``: a drop-in for megatron-core's ``DotProductAttention`` running
``megatron_outeff.ops.outeff_attention`` (every softmax variant, clipping, per-head gate).

Placed in ``SelfAttentionSubmodules.core_attention`` it takes the same constructor and forward
arguments as ``DotProductAttention`` (megatron-core 0.16.1) and returns the same layout
[sq, b, heads_per_partition * head_dim]. Two extra keyword-only constructor arguments carry the
variant: ``variant`` (an ``AttentionVariantConfig``) and ``seq_length`` (for the clip_alpha form).
megatron's ``Attention.__init__`` calls the core-attention class directly (no ModuleSpec params),
so they are bound with ``functools.partial`` by ``OutEffSelfAttention`` (from its own ModuleSpec
params) or by ``OutEffCoreAttention.with_variant(variant)``. Without a variant the module reads
megatron's own ``config.softmax_type`` and behaves like ``DotProductAttention`` (vanilla /
off-by-one / learnable).

Math (per query-head h; a_h the sink logit, see ``megatron_outeff.ops.variants``):
    p   = exp(s * q k^T) / (exp(a_h) + sum_j exp(s * q k_j^T))        s = softmax scale
    p'  = clip((zeta - gamma) p + gamma, 0, 1)                         (clipped variants)
    out = g * dropout(p') V                                            (gated variants: g_h per head, or
                                                                        g_{h,c} per head and channel)

Softmax scale: as ``DotProductAttention``: ``softmax_scale`` (megatron passes
``config.softmax_scale``) or 1/sqrt(head_dim). ``apply_query_key_layer_scaling`` divides the
matmul's scale by the layer number and multiplies the fp32 scores back by it before the
softmax; the product is unchanged, and the ops already do all softmax math in fp32, so the net
scale is used directly.

This module only translates megatron's layouts ([s, b, h, d] -> the ops' [b, s, h, d]) and masks;
every step of the attention (scores, sink softmax, clip, dropout, P V, gate) and the choice of a
kernel for the device are ``outeff_attention`` / ``outeff_attention_probs``.

Masks (megatron's convention: bool, True = masked out):
    attention_mask None, causal type, sq > 1   -> causal (sq == sk, as megatron asserts)
    attention_mask None otherwise              -> no mask
    attention_mask [b|1, 1, 1, sk]             -> key padding (outeff_attention key_padding_mask)
    attention_mask [b|1, 1, sq, sk] == causal  -> causal (the flash path)
    any other mask                             -> outeff_attention(mask=...) (a materialised path)
As in megatron's torch path a given mask replaces the causal one. One intentional difference: a
fully masked row gives a zero output here (megatron fills -10000 and, for vanilla softmax,
averages the masked values).

Dropout runs inside the megatron RNG tracker's fork (unless sequence parallel), as in
``DotProductAttention``, so TP ranks draw consistent masks.

Learnable offset: parameter ``softmax_offset`` [heads_per_partition], sharded by head
(``tensor_model_parallel``, ``partition_dim`` 0, ``partition_stride`` 1), with megatron's checkpoint
key and ``sharded_state_dict``: megatron's ``softmax_type='learnable'`` checkpoints load here and
back. Its shape, initial value (0) and names are ``ops.variants.variant_tensors``' (created here by
``create_variant_parameters``). Softmax_1 / softmax_n need no state (megatron's 'off-by-one' keeps
a plain, unsaved tensor).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional, Tuple

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from torch import Tensor

from megatron_outeff.ops import outeff_attention, outeff_attention_probs, variant_tensors
from megatron_outeff.ops.reference import causal_mask
from megatron_outeff.ops.variants import GATE_FAMILIES, VariantTensor

from .variant import AttentionVariantConfig, resolve_variant


def check_variant_fits(variant: AttentionVariantConfig, config: TransformerConfig, tp_size: int) -> None:
    """One-line ValueError if ``variant`` cannot run on a model of this shape / parallel layout.

    Call before building anything (``OutEffSelfAttention`` does, before megatron allocates weights).
    """
    heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    if heads % tp_size != 0:
        raise ValueError(f"num_attention_heads={heads} is not divisible by tensor_model_parallel_size={tp_size}")
    if groups % tp_size != 0 and tp_size % groups != 0:
        raise ValueError(
            f"num_query_groups={groups} and tensor_model_parallel_size={tp_size}: one must divide the other"
        )
    if getattr(config, "context_parallel_size", 1) != 1:
        raise ValueError(
            f"context_parallel_size={config.context_parallel_size}: OutEffCoreAttention has no context parallelism"
        )
    if getattr(config, "window_size", None) is not None:
        raise ValueError(
            f"window_size={config.window_size}: sliding-window attention is not supported by OutEffCoreAttention"
        )
    if variant.gate == "elementwise" and groups < tp_size:
        raise ValueError(
            f"gate='elementwise' with num_query_groups={groups} < tensor_model_parallel_size={tp_size}: "
            "megatron-core 0.16.1 does not split the gate rows of a query group shared by several ranks"
        )
    layer_variant_tensors(variant, config)  # the gate's own shape rules (ops.variants.variant_tensors)


def layer_variant_tensors(variant: AttentionVariantConfig, config: TransformerConfig) -> Tuple[VariantTensor, ...]:
    """The tensors ``variant`` adds to one attention layer of this config (``ops.variants.variant_tensors``;
    the elementwise gate has a bias iff megatron's linear_qkv has one)."""
    heads = config.num_attention_heads
    return variant_tensors(
        variant,
        num_heads=heads,
        head_dim=config.kv_channels or config.hidden_size // heads,
        hidden_size=config.hidden_size,
        qkv_bias=bool(config.add_bias_linear or config.add_qkv_bias),
    )


def create_variant_parameters(
    module: torch.nn.Module,
    owner: str,
    variant: AttentionVariantConfig,
    config: TransformerConfig,
    tp_rank: int,
    tp_size: int,
) -> Tuple[VariantTensor, ...]:
    """Register on ``module`` this rank's shards of the variant tensors megatron keeps in ``owner``
    ("core_attention", "head_gate": the first part of ``VariantTensor.megatron``), under the rest of that
    name, initialised as the description says (a constant, or ``config.init_method``). Each parameter
    carries its description as ``param.variant_tensor`` (the optimizer's parameter roles read it).
    Returns those descriptions, in creation order."""
    mine = []
    for t in layer_variant_tensors(variant, config):
        where, _, name = t.megatron.partition(".")
        if where != owner:
            continue
        # Constants are the same on every rank whatever the init path.
        init = config.init_method if t.init is None else functools.partial(torch.nn.init.constant_, val=t.init)
        param = init_sharded_parameter(config, t.shape, init, tp_rank, tp_size, partition_dim=t.tp_dim)
        param.variant_tensor = t
        module.register_parameter(name, param)
        mine.append(t)
    return tuple(mine)


def local_name(t: VariantTensor) -> str:
    """The parameter's name inside the module that holds it ("softmax_offset", "bias", ...)."""
    return t.megatron.partition(".")[2]


def init_sharded_parameter(
    config: TransformerConfig, full_shape: Tuple[int, ...], init_fn, tp_rank: int, tp_size: int, partition_dim: int = 0
) -> torch.nn.Parameter:
    """A TP-sharded parameter (split along ``partition_dim``) initialised like megatron's layers.

    use_cpu_initialization: the FULL tensor is drawn on CPU from the default generator and this
    rank keeps its slice (megatron's ``_initialize_affine_weight_cpu``), so TP shards are exact
    slices of the TP=1 tensor for the same seed. Otherwise the shard is drawn on the device under
    the model-parallel RNG tracker (megatron's ``_initialize_affine_weight_gpu``).
    """
    shard_shape = list(full_shape)
    if shard_shape[partition_dim] % tp_size != 0:
        raise ValueError(
            f"parameter shape {tuple(full_shape)} dim {partition_dim} is not divisible by TP size {tp_size}"
        )
    shard_shape[partition_dim] //= tp_size
    if config.use_cpu_initialization:
        full = torch.zeros(full_shape, dtype=torch.float32)
        if config.perform_initialization:
            init_fn(full)
        shard = full.chunk(tp_size, dim=partition_dim)[tp_rank].to(config.params_dtype).clone()
    else:
        shard = torch.zeros(shard_shape, dtype=config.params_dtype, device=torch.cuda.current_device())
        if config.perform_initialization:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                init_fn(shard)
    param = torch.nn.Parameter(shard)
    tensor_parallel.set_tensor_model_parallel_attributes(param, True, partition_dim, 1)
    return param


class OutEffCoreAttention(MegatronModule):
    """Core attention (after QKV, before linear_proj) with outlier-efficient softmax variants."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        *,
        variant: Optional[AttentionVariantConfig] = None,
        seq_length: Optional[int] = None,
        impl: str = "auto",
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()

        self.variant = resolve_variant(config, variant)
        check_variant_fits(self.variant, config, tp_size)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.impl = impl

        heads = config.num_attention_heads
        self.hidden_size_per_attention_head = config.kv_channels
        self.num_attention_heads_per_partition = heads // tp_size
        self.hidden_size_per_partition = self.num_attention_heads_per_partition * config.kv_channels
        # Net scale of DotProductAttention (query-key layer scaling cancels, see module doc).
        self.softmax_scale = (
            1.0 / math.sqrt(self.hidden_size_per_attention_head) if softmax_scale is None else float(softmax_scale)
        )
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)
        self.clip = self.variant.clip_pair(seq_length)

        self.register_parameter("softmax_offset", None)  # the learnable offset, if the variant has one:
        self.variant_tensors = create_variant_parameters(self, "core_attention", self.variant, config, tp_rank, tp_size)
        self._gate: Optional[Tensor] = None  # set only inside gate_scope()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def with_variant(cls, variant: AttentionVariantConfig, seq_length: Optional[int] = None, **kwargs):
        """A core-attention builder for ``SelfAttentionSubmodules.core_attention`` bound to ``variant``.

        For megatron's stock ``SelfAttention`` (or any attention that builds its core from the
        submodules). Per-head gates need the layer input, which only ``OutEffSelfAttention`` has; the elementwise
        gate is megatron's own ``attention_output_gate``, which megatron's ``SelfAttention`` applies itself.
        """
        if variant is not None and GATE_FAMILIES.get(AttentionVariantConfig.from_dict(variant).gate) == "head":
            raise ValueError(
                f"gate={variant.gate!r}: a per-head gate needs OutEffSelfAttention (get_outeff_layer_spec), not a core attention alone"
            )
        return functools.partial(cls, variant=variant, seq_length=seq_length, **kwargs)

    @contextlib.contextmanager
    def gate_scope(self, gate):
        """Within this scope forward() multiplies its output by the gate: per head, gate [b, sq, h], or per
        head and channel, gate [b, sq, h, d] (values in (0, 1)); ``gate`` is the tensor or a function
        returning it when forward() runs.

        ``OutEffSelfAttention`` computes the gate (per head from the layer input; elementwise from its
        rows of linear_qkv, inside megatron's forward) and opens this scope around megatron's forward;
        the core attention itself never sees the layer input.
        """
        previous, self._gate = self._gate, gate
        try:
            yield
        finally:
            self._gate = previous

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> [sq, b, np * hn]."""
        if packed_seq_params is not None:
            raise ValueError("packed_seq_params: OutEffCoreAttention supports only the sbhd layout (no THD packing)")
        if attention_bias is not None:
            raise ValueError("attention_bias: not supported by OutEffCoreAttention (as DotProductAttention)")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b, heads, _ = query.shape
        sk = key.shape[0]
        # [s, b, h, d] -> [b, s, h, d]: the ops' layout (a view; the ops handle strides).
        q, k, v = (t.transpose(0, 1) for t in (query, key, value))
        causal, key_padding, dense_mask = self._resolve_mask(attention_mask, mask_type, b, sq, sk)
        dropout_p = self.dropout_p if self.training else 0.0

        rng = contextlib.nullcontext()
        if dropout_p > 0 and not self.config.sequence_parallel:
            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        with rng:
            gate = self._gate() if callable(self._gate) else self._gate
            out = outeff_attention(
                q,
                k,
                v,
                **self._softmax_args(),
                clip=self.clip,
                gate=gate,
                causal=causal,
                key_padding_mask=key_padding,
                mask=dense_mask,
                scale=self.softmax_scale,
                dropout_p=dropout_p,
                impl=self.impl,
            )
        # [b, sq, np, hn] -> [sq, b, np * hn]
        return out.transpose(0, 1).reshape(sq, b, heads * out.shape[-1])

    def _resolve_mask(self, mask, mask_type, b, sq, sk):
        """(causal, key_padding_mask [b, sk] True=keep, dense bool mask True=masked) per megatron's rules."""
        if mask is None:
            if mask_type == AttnMaskType.causal and sq > 1:
                if sq != sk:
                    raise ValueError(
                        f"causal mask with sq={sq} != sk={sk}: megatron's causal type is for self attention"
                    )
                return True, None, None
            return False, None, None
        if mask.dtype != torch.bool:
            raise ValueError(
                f"attention_mask dtype {mask.dtype}: expected torch.bool, True = masked out (megatron convention)"
            )
        if (
            mask.dim() != 4
            or mask.shape[1] != 1
            or mask.shape[0] not in (1, b)
            or mask.shape[-1] != sk
            or mask.shape[-2] not in (1, sq)
        ):
            raise ValueError(
                f"attention_mask shape {tuple(mask.shape)}: expected [b or 1, 1, sq or 1, sk] = [*, 1, {sq}, {sk}]"
            )
        if mask.shape[-2] == 1:  # one row per sample: a key padding mask
            return False, (~mask.reshape(mask.shape[0], sk)).expand(b, sk), None
        if sq == sk and torch.equal(mask, causal_mask(sq, sk, mask.device).view(1, 1, sq, sk).expand_as(mask)):
            return True, None, None
        return False, None, mask

    def _softmax_args(self) -> dict:
        return dict(self.variant.softmax_args(), offset=self.softmax_offset)

    @torch.no_grad()
    def probe_probabilities(self, query, key, attention_mask, attn_mask_type=None) -> Tensor:
        """The softmax probabilities this layer computes for megatron-layout inputs (query [sq, b, np, hn],
        key [sk, b, ng, hn]), BEFORE clipping, materialised [b, heads, sq, sk]: for monitoring (e.g. the
        attention mass on the sink, 1 - row sum), never on the training path."""
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        sq, b = query.shape[:2]
        sk = key.shape[0]
        causal, key_padding, dense_mask = self._resolve_mask(attention_mask, mask_type, b, sq, sk)
        return outeff_attention_probs(
            query.transpose(0, 1),
            key.transpose(0, 1),
            **self._softmax_args(),
            causal=causal,
            key_padding_mask=key_padding,
            mask=dense_mask,
            scale=self.softmax_scale,
        )

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # A one-line error for an offset that does not fit this layer (instead of torch's list).
        for t in self.variant_tensors:
            key, param = prefix + local_name(t), getattr(self, local_name(t))
            if key in state_dict and tuple(state_dict[key].shape) != tuple(param.shape):
                raise ValueError(
                    f"{key}: checkpoint shape {tuple(state_dict[key].shape)} does not fit {tuple(param.shape)} "
                    f"(heads per tensor-parallel partition) of this {self.variant.describe()} layer"
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: Tuple[Tuple[int, int, int], ...] = (), metadata: Optional[dict] = None
    ) -> ShardedStateDict:
        """As megatron's ``DotProductAttention``: ``softmax_offset`` sharded along heads (dim 0)."""
        return sharded_variant_state_dict(self, prefix, sharded_offsets, metadata)

    def extra_repr(self) -> str:
        return f"variant={self.variant.describe()!r}, heads_per_partition={self.num_attention_heads_per_partition}, scale={self.softmax_scale:.4g}"


def sharded_variant_state_dict(module, prefix: str, sharded_offsets, metadata) -> ShardedStateDict:
    """dist_checkpointing's view of a module holding variant tensors (``module.variant_tensors``): each
    sharded along its ``tp_dim`` (megatron's ``make_sharded_tensors_for_checkpoint``)."""
    state_dict = module.state_dict(prefix="", keep_vars=True)
    metadata = ensure_metadata_has_dp_cp_group(metadata)
    return make_sharded_tensors_for_checkpoint(
        state_dict,
        prefix,
        {local_name(t): t.tp_dim for t in module.variant_tensors},
        sharded_offsets,
        tp_group=module.tp_group,
        dp_cp_group=metadata["dp_cp_group"],
    )
