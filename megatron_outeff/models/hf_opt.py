"""Lossless Hugging Face OPT <-> megatron-core OPT (``build_opt_model``) weight mapping at any TP/PP.

Layouts (H heads of width d, hidden h = H*d, per TP rank r of T, per PP stage p of P):

* ``linear_qkv`` (column parallel): megatron fuses Q, K, V per query group. OPT is multi-head
  attention, so one group per head and the rows are [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], d rows
  each (megatron's SelfAttention views the output as [.., groups, (q_per_group + 2) * d] and
  splits it q | k | v). Rank r holds heads r*H/T .. (r+1)*H/T - 1: a contiguous row block.
  Bias: same layout. With the elementwise gate (``attention_output_gate``; the variant's ``fused_qkv``
  tensors) each head's block is [q_h g_h k_h v_h]: the gate rows come from Hugging Face's
  ``self_attn.gate_proj``.
* ``linear_fc1`` (column parallel): row block of weight and bias.
* ``linear_proj`` (= out_proj) and ``linear_fc2`` (row parallel): column block of the weight; the
  bias is NOT split: every rank holds the full bias and megatron adds it once, after the TP
  all-reduce. Export takes it from TP rank 0 (never a sum over ranks).
* Word embeddings: the vocabulary is zero-padded to ``padded_vocab_size`` rows and split by rows
  across TP; export concatenates and drops the padding rows. The LM head is tied: no tensor of
  its own except on the last stage of a pipeline (megatron's ``output_layer.weight`` copy there).
* Positions: the full ``max_positions + 2`` table, copied as is (see models/opt.py).
* Pipeline: stage p holds layers p*L/P .. (p+1)*L/P - 1 as ``decoder.layers.0..``; embeddings on
  stage 0, final LayerNorm (and the output-layer copy when P > 1) on stage P-1.
* OPT-350m (models/opt_layers.py): the token embedding (and the tied head) is E =
  ``word_embed_proj_dim`` wide; ``model.decoder.project_in.weight`` [h, E] <->
  ``embedding.word_embeddings.project_in.weight`` (stage 0) and ``model.decoder.project_out.weight``
  [E, h] <-> ``output_layer.project_out.weight`` (stage P-1), both replicated on every TP rank.
  Post-LN layers: ``self_attn_layer_norm`` <-> ``post_self_attn_layernorm`` and the layer's
  ``final_layer_norm`` <-> ``post_mlp_layernorm``; there is no decoder-level final LayerNorm.

Forward passes are identical. One training-time difference is inherent, not a mapping loss:
Hugging Face's ``embed_tokens`` has ``padding_idx=pad_token_id`` (1), which zeroes that row's
lookup gradient; megatron's vocab-parallel embedding has no padding row.

Reads config.json + safetensors only (never pickles). Every check runs before any weight is touched.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

import torch

from megatron_outeff.errors import OutEffError, with_context
from megatron_outeff.utils.atomic import atomic_output_dir
from megatron_outeff.utils.safetensors_io import check_readable, load_tensors

from .common import ARCH_SIZE_FIELDS, padded_vocab_size
from .opt import OPT_POSITION_OFFSET, OPTArchConfig, check_parallel_layout, load_arch_config

HF_DECODER = "model.decoder."
HF_LM_HEAD = "lm_head.weight"
HF_LAYER_PREFIX = HF_DECODER + "layers."  # the family interface (models/family.py)
# {megatron vocabulary-parallel tensor: the full padded tensor it is cut from}: the LM head is tied (family.py)
VOCAB_PARALLEL = {
    "embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "output_layer.weight": "embedding.word_embeddings.weight",
}

# Architecture fields a checkpoint must agree on with the target (dropouts and init do not matter).
STRUCTURAL_FIELDS = ARCH_SIZE_FIELDS + ("word_embed_proj_dim", "do_layer_norm_before", "activation")

# (HF name inside decoder.layers.N., megatron name inside decoder.layers.N.), pre-LN / post-LN.
_LAYER_NORMS = (("self_attn_layer_norm", "input_layernorm"), ("final_layer_norm", "pre_mlp_layernorm"))
_POST_LAYER_NORMS = (("self_attn_layer_norm", "post_self_attn_layernorm"), ("final_layer_norm", "post_mlp_layernorm"))
HF_PROJECT_IN, MG_PROJECT_IN = HF_DECODER + "project_in.weight", "embedding.word_embeddings.project_in.weight"
HF_PROJECT_OUT, MG_PROJECT_OUT = HF_DECODER + "project_out.weight", "output_layer.project_out.weight"


def _layer_norms(arch: OPTArchConfig) -> tuple:
    return _LAYER_NORMS if arch.do_layer_norm_before else _POST_LAYER_NORMS


# Attention-variant tensors: every tensor the variant adds (megatron_outeff.ops.variants.variant_tensors, the one
# description: names inside the attention module, shape, TP split) lives at
#   decoder.layers.N.self_attention.<megatron name> (this rank's heads) <-> model.decoder.layers.N.self_attn.<hf name>
MG_ATTENTION = "self_attention."
HF_ATTENTION = "self_attn."
_HF_VARIANT_RE = re.compile(r"^model\.decoder\.layers\.(\d+)\.self_attn\.(.+)$")


def arch_variant_tensors(arch, variant, *, qkv_bias: bool = True) -> tuple:
    """The tensors ``variant`` (an AttentionVariantConfig or a mapping of its fields) adds to each attention
    layer of ``arch`` (any family's: num_attention_heads, head_dim, hidden_size; ``ops.variants.variant_tensors``).
    One-line OutEffError for a gate the architecture cannot have."""
    from megatron_outeff.ops.variants import AttentionVariantConfig, variant_tensors

    try:
        variant = AttentionVariantConfig.from_dict(variant)
        return variant_tensors(
            variant,
            num_heads=arch.num_attention_heads,
            head_dim=arch.head_dim,
            hidden_size=arch.hidden_size,
            qkv_bias=qkv_bias,
        )
    except ValueError as e:
        raise with_context(arch.name, e) from None


def opt_variant_tensors(arch: OPTArchConfig, variant) -> tuple:
    """``arch_variant_tensors`` of an OPT (biases on q/k/v, so on the elementwise gate too)."""
    return arch_variant_tensors(arch, variant, qkv_bias=True)


variant_tensors_of = opt_variant_tensors  # the family interface (models/family.py)


def layer_variant_shapes(tensors, num_layers: int, layer_prefix: str) -> dict[str, tuple]:
    """{Hugging Face name: full shape} of ``tensors`` in every layer ``{layer_prefix}{i}.self_attn.``, in layer order."""
    return {f"{layer_prefix}{i}.{HF_ATTENTION}{t.hf}": t.shape for i in range(num_layers) for t in tensors}


def variant_hf_shapes(arch: OPTArchConfig, variant) -> dict[str, tuple]:
    """{Hugging Face name: full shape} of every variant tensor of every layer, in layer order."""
    return layer_variant_shapes(opt_variant_tensors(arch, variant), arch.num_layers, HF_LAYER_PREFIX)


def split_variant_state(hf_sd: Mapping[str, torch.Tensor], layer_re: re.Pattern = _HF_VARIANT_RE) -> tuple[dict, dict]:
    """(standard tensors, attention-variant tensors) of a Hugging Face state dict: a variant tensor is any
    name some variant gives a tensor (``ops.variants.variant_tensor_owners``) inside a layer's ``self_attn``
    (``layer_re``: group 2 the name inside it; OPT's layers by default)."""
    from megatron_outeff.ops.variants import variant_tensor_owners

    names = variant_tensor_owners("hf")
    plain, extra = {}, {}
    for k, v in hf_sd.items():
        m = layer_re.match(k)
        (extra if m and m.group(2) in names else plain)[k] = v
    return plain, extra


# --------------------------------------------------------------------------------------------
# Config translation.


# Hugging Face OPTConfig key -> (the OPTArchConfig field it holds, transformers' OPTConfig default): the one
# name mapping both directions use (arch_from_hf_config, hf_config_dict). Besides these: word_embed_proj_dim
# (None in the arch when equal to hidden_size) and layernorm_epsilon (HF OPT hard-codes 1e-5).
HF_CONFIG_KEYS = {
    "num_hidden_layers": ("num_layers", 12),
    "hidden_size": ("hidden_size", 768),
    "num_attention_heads": ("num_attention_heads", 12),
    "ffn_dim": ("ffn_hidden_size", 3072),
    "vocab_size": ("vocab_size", 50272),
    "max_position_embeddings": ("max_position_embeddings", 2048),
    "do_layer_norm_before": ("do_layer_norm_before", True),
    "activation_function": ("activation", "relu"),
    "dropout": ("hidden_dropout", 0.1),
    "attention_dropout": ("attention_dropout", 0.0),
    "init_std": ("init_method_std", 0.02),
}


def arch_from_hf_config(cfg: Mapping, name: Optional[str] = None) -> OPTArchConfig:
    """OPTArchConfig of a Hugging Face OPT config.json mapping (one-line ValueError if not OPT)."""
    mt = cfg.get("model_type")
    if mt != "opt":
        raise OutEffError(f"config.json model_type={mt!r}: expected 'opt'")
    # Features our megatron OPT has no representation for: refuse rather than silently change the model.
    for key, want in (
        ("enable_bias", True),
        ("layer_norm_elementwise_affine", True),
        ("_remove_final_layer_norm", False),
        ("tie_word_embeddings", True),
    ):
        if cfg.get(key, want) != want:
            raise OutEffError(f"config.json {key}={cfg.get(key)!r}: expected {want!r} (only standard OPT is supported)")
    if float(cfg.get("layerdrop", 0.0)) != 0.0:
        raise OutEffError(f"config.json layerdrop={cfg.get('layerdrop')!r}: expected 0")
    hidden = cfg.get("hidden_size", 768)
    wep = cfg.get("word_embed_proj_dim")
    if name is None:
        name = Path(str(cfg.get("_name_or_path") or "")).name or f"opt-hf-{cfg.get('num_hidden_layers')}x{hidden}"
    fields = {
        ours: float(cfg.get(key, default)) if isinstance(default, float) else cfg.get(key, default)
        for key, (ours, default) in HF_CONFIG_KEYS.items()
    }
    return OPTArchConfig(
        name=name, word_embed_proj_dim=None if wep in (None, hidden) else wep, layernorm_epsilon=1e-5, **fields
    )  # 1e-5: hard-coded in HF OPT (nn.LayerNorm default)


def hf_config_dict(arch: OPTArchConfig, dtype: Optional[torch.dtype] = None) -> dict:
    """Keyword arguments of transformers.OPTConfig describing ``arch``."""
    arch = load_arch_config(arch)
    if arch.layernorm_epsilon != 1e-5:
        raise OutEffError(f"{arch.name}: layernorm_epsilon={arch.layernorm_epsilon}: Hugging Face OPT hard-codes 1e-5")
    d = {key: getattr(arch, ours) for key, (ours, _) in HF_CONFIG_KEYS.items()}
    fixed = dict(enable_bias=True, layer_norm_elementwise_affine=True, tie_word_embeddings=True)
    return hf_config_with(d, dtype, word_embed_proj_dim=arch.embed_dim, **fixed)


def hf_config_with(d: dict, dtype: Optional[torch.dtype], **fields) -> dict:
    """A family's Hugging Face config keyword arguments: ``d`` (from its HF_CONFIG_KEYS), ``fields`` (what the
    family derives or fixes) and ``dtype`` ('float32', ... as transformers spells it; None: not recorded)."""
    d.update(fields)
    if dtype is not None:
        d["dtype"] = str(dtype).removeprefix("torch.")
    return d


def check_structural_fields(got, expected, fields: Sequence[str], what: str, value=getattr) -> None:
    """One-line OutEffError naming every field of ``fields`` (compared as ``value(arch, field)``) on which
    architecture ``got`` (of ``what``) differs from ``expected``; any family."""
    diffs = [f for f in fields if value(got, f) != value(expected, f)]
    if diffs:
        g = ", ".join(f"{f}={getattr(got, f)}" for f in diffs)
        e = ", ".join(f"{f}={getattr(expected, f)}" for f in diffs)
        raise OutEffError(f"{what} has {g}; expected {expected.name}'s {e}")


def _structural_value(arch: OPTArchConfig, field: str):
    # word_embed_proj_dim None and equal to hidden_size are the same model
    return arch.embed_dim if field == "word_embed_proj_dim" else getattr(arch, field)


def check_same_architecture(got: OPTArchConfig, expected: OPTArchConfig, what: str = "checkpoint") -> None:
    check_structural_fields(got, expected, STRUCTURAL_FIELDS, what, _structural_value)


# --------------------------------------------------------------------------------------------
# Hugging Face state dict: expected shapes and validation.


def hf_expected_shapes(arch: OPTArchConfig) -> dict[str, tuple]:
    """{name: shape} of OPTForCausalLM's state dict (lm_head.weight excluded), in its order."""
    h, f, v, e = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size, arch.embed_dim
    shapes = {
        HF_DECODER + "embed_tokens.weight": (v, e),
        HF_DECODER + "embed_positions.weight": (arch.max_position_embeddings + OPT_POSITION_OFFSET, h),
    }
    if e != h:
        shapes[HF_PROJECT_OUT] = (e, h)
        shapes[HF_PROJECT_IN] = (h, e)
    if arch.do_layer_norm_before:
        shapes[HF_DECODER + "final_layer_norm.weight"] = (h,)
        shapes[HF_DECODER + "final_layer_norm.bias"] = (h,)
    for i in range(arch.num_layers):
        # In OPTForCausalLM.state_dict() order (module registration order).
        p = f"{HF_DECODER}layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (h, h)
            shapes[p + f"self_attn.{proj}.bias"] = (h,)
        for name, shape in (
            ("self_attn_layer_norm", (h,)),
            ("fc1", (f, h)),
            ("fc2", (h, f)),
            ("final_layer_norm", (h,)),
        ):
            shapes[p + f"{name}.weight"] = shape
            shapes[p + f"{name}.bias"] = shape[:1]
    return shapes


def check_hf_shapes(hf_sd: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple], arch, ignored=lambda k: False):
    """One-line OutEffError unless ``hf_sd`` holds exactly the tensors of ``shapes`` (the family's
    ``hf_expected_shapes(arch)``), each of its shape; names for which ``ignored(name)`` holds may be present too."""
    from megatron_outeff.models.family import family_of

    missing = [k for k in shapes if k not in hf_sd]
    if missing:
        raise OutEffError(f"Hugging Face state dict lacks {len(missing)} tensor(s) of {arch.name}, e.g. {missing[:3]}")
    unexpected = [k for k in hf_sd if k not in shapes and not ignored(k)]
    if unexpected:
        raise OutEffError(
            f"Hugging Face state dict has {len(unexpected)} tensor(s) unknown to {family_of(arch).label}, "
            f"e.g. {unexpected[:3]}"
        )
    for k, shape in shapes.items():
        if tuple(hf_sd[k].shape) != shape:
            raise OutEffError(f"{k}: shape {tuple(hf_sd[k].shape)}, expected {shape} for {arch.name}")


def validate_hf_state_dict(hf_sd: Mapping[str, torch.Tensor], arch: OPTArchConfig) -> None:
    """One-line ValueError unless ``hf_sd`` is exactly a standard OPT of architecture ``arch``."""
    check_hf_shapes(hf_sd, hf_expected_shapes(arch), arch, ignored=lambda k: k == HF_LM_HEAD)
    if HF_LM_HEAD in hf_sd and not torch.equal(hf_sd[HF_LM_HEAD], hf_sd[HF_DECODER + "embed_tokens.weight"]):
        raise OutEffError(f"{HF_LM_HEAD} differs from the token embedding; expected tied weights (OPT)")


# --------------------------------------------------------------------------------------------
# Hugging Face -> one megatron rank.


def _stage_layers(arch: OPTArchConfig, pp_rank: int, pp_size: int) -> range:
    n = arch.num_layers // pp_size
    return range(pp_rank * n, (pp_rank + 1) * n)


def _check_ranks(arch, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int) -> None:
    """The layout against ``arch`` (its family's check_parallel_layout) and the ranks inside it."""
    from megatron_outeff.models.family import family_of

    family_of(arch).arch.check_parallel_layout(arch, tp_size, pp_size)
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise OutEffError(
            f"tp_rank={tp_rank}/tp_size={tp_size}, pp_rank={pp_rank}/pp_size={pp_size}: expected 0 <= rank < size"
        )


def _vocab_rows(arch, vocab_size: Optional[int], tp_size: int) -> int:
    """The megatron model's vocabulary rows: ``vocab_size``, default padded for TP (as the builders)."""
    rows = padded_vocab_size(arch.vocab_size, tp_size) if vocab_size is None else vocab_size
    if rows < arch.vocab_size or rows % tp_size != 0:
        raise OutEffError(f"vocab_size={rows}: expected >= {arch.vocab_size} and divisible by tp_size={tp_size}")
    return rows


def _fuse_qkv(parts: Sequence[torch.Tensor], heads: int) -> torch.Tensor:
    """[h(, h)] each of q(, gate), k, v -> megatron's per-head interleaved [q_0 (g_0) k_0 v_0 | q_1 ...] rows."""
    d = parts[0].shape[0] // heads
    rest = parts[0].shape[1:]
    return torch.stack([t.reshape(heads, d, *rest) for t in parts], dim=1).reshape(len(parts) * heads * d, *rest)


def _unfuse_qkv(qkv: torch.Tensor, heads: int, n_parts: int = 3) -> tuple[torch.Tensor, ...]:
    """The inverse of ``_fuse_qkv``: ``n_parts`` tensors [h(, h)] (q, k, v; or q, gate, k, v)."""
    d = qkv.shape[0] // (n_parts * heads)
    rest = qkv.shape[1:]
    g = qkv.reshape(heads, n_parts, d, *rest)
    return tuple(g[:, j].reshape(heads * d, *rest).contiguous() for j in range(n_parts))


def _fused_gate(tensors, kind: str):
    """The variant's tensor fused into linear_qkv.<kind> (the elementwise gate's rows), or None."""
    return next((t for t in tensors if t.fused_qkv and t.megatron == f"linear_qkv.{kind}"), None)


def _chunk(t: torch.Tensor, rank: int, size: int, dim: int = 0) -> torch.Tensor:
    return t.chunk(size, dim=dim)[rank].clone()


def _padded_embedding(embed: torch.Tensor, vocab_rows: int) -> torch.Tensor:
    if vocab_rows == embed.shape[0]:
        return embed
    pad = embed.new_zeros(vocab_rows - embed.shape[0], embed.shape[1])
    return torch.cat([embed, pad], dim=0)


@dataclasses.dataclass(frozen=True)
class RankImport:
    """One megatron rank's part of an import from Hugging Face, after every check (``hf_to_megatron``):
    the standard tensors ``hf_sd``, the variant's ``extras`` and their descriptions ``tensors``, the
    megatron vocabulary rows and this rank's (TP, PP) position. A family's ``megatron_rank_state_dict``
    reads it."""

    arch: object
    hf_sd: Mapping[str, torch.Tensor]
    extras: Mapping[str, torch.Tensor]
    tensors: tuple
    vocab_rows: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int

    @property
    def first(self) -> bool:
        return self.pp_rank == 0

    @property
    def last(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def cut(self, t: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This TP rank's block of ``t`` along ``dim`` (a fresh copy)."""
        return _chunk(t, self.tp_rank, self.tp_size, dim)

    def embedding(self, key: str) -> torch.Tensor:
        """This TP rank's rows of the Hugging Face vocabulary tensor ``key``, zero-padded to ``vocab_rows``."""
        return self.cut(_padded_embedding(self.hf_sd[key], self.vocab_rows))

    def layers(self, hf_layer_prefix: str):
        """(Hugging Face prefix, megatron prefix) of each layer of this pipeline stage."""
        for local, g in enumerate(_stage_layers(self.arch, self.pp_rank, self.pp_size)):
            yield f"{hf_layer_prefix}{g}.", f"decoder.layers.{local}."

    def variant_shards(self, hp: str, mp: str) -> dict[str, torch.Tensor]:
        """{megatron name under ``mp``: this rank's heads} of each variant tensor not fused into linear_qkv,
        from the full Hugging Face ones under ``hp``."""
        out = {}
        for t in (t for t in self.tensors if not t.fused_qkv):
            full = self.extras[hp + HF_ATTENTION + t.hf]
            out[mp + MG_ATTENTION + t.megatron] = full.clone() if t.tp_dim is None else self.cut(full, t.tp_dim)
        return out


def hf_to_megatron(
    hf_sd: Mapping[str, torch.Tensor],
    arch,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    *,
    vocab_size: Optional[int] = None,
    variant=None,
) -> dict[str, torch.Tensor]:
    """The state dict of one (tp_rank, pp_rank) megatron model of ``arch``'s family from a full Hugging Face
    CausalLM state dict: every check first (the layout, the variant's tensors, the standard tensors, the
    vocabulary rows), then the family mapping's ``megatron_rank_state_dict``. ``vocab_size``: the megatron
    model's (padded) vocabulary, default ``padded_vocab_size(arch.vocab_size, tp_size)`` as in the builders.
    ``variant``: the attention variant (``AttentionVariantConfig``) whose tensors ``hf_sd`` holds, exactly
    those of ``ops.variants.variant_tensors`` for every layer, mapped to this rank's heads (the elementwise
    gate's rows into linear_qkv); None: the plain family, any variant tensor is refused as unknown.

    Returned tensors are fresh copies in the checkpoint's dtype; load them with
    :func:`load_megatron_state_dict` (megatron's ``_extra_state`` entries carry no weights).
    """
    from megatron_outeff.models.family import family_of

    mapping = family_of(arch).hf
    _check_ranks(arch, tp_rank, tp_size, pp_rank, pp_size)
    extras: dict = {}
    tensors = ()
    if variant is not None:
        hf_sd, extras = mapping.split_variant_state(hf_sd)
        tensors = _check_variant_state(extras, arch, variant)
    mapping.validate_hf_state_dict(hf_sd, arch)
    vocab_rows = _vocab_rows(arch, vocab_size, tp_size)
    rank = RankImport(arch, hf_sd, extras, tensors, vocab_rows, tp_rank, tp_size, pp_rank, pp_size)
    return mapping.megatron_rank_state_dict(rank)


def hf_state_dict_to_megatron(hf_sd: Mapping[str, torch.Tensor], arch: Union[OPTArchConfig, str], *layout, **options):
    """The state dict of one (tp_rank, pp_rank) megatron OPT model (``build_opt_model``) from a full
    Hugging Face OPTForCausalLM state dict: ``hf_to_megatron`` (``layout``: tp_rank, tp_size, pp_rank,
    pp_size; ``options``: vocab_size, variant)."""
    return hf_to_megatron(hf_sd, load_arch_config(arch), *layout, **options)


def megatron_rank_state_dict(rank: RankImport) -> dict[str, torch.Tensor]:
    """``hf_to_megatron``'s OPT layout (module doc)."""
    arch, hf_sd, extras, tensors = rank.arch, rank.hf_sd, rank.extras, rank.tensors
    H = arch.num_attention_heads
    out: dict[str, torch.Tensor] = {}
    first, last = rank.first, rank.last
    word = None
    if first or (last and rank.pp_size > 1):
        word = rank.embedding(HF_DECODER + "embed_tokens.weight")
    projected = arch.embed_dim != arch.hidden_size
    if first:
        out["embedding.word_embeddings.weight"] = word
        if projected:
            out[MG_PROJECT_IN] = hf_sd[HF_PROJECT_IN].clone()
        out["embedding.position_embeddings.weight"] = hf_sd[HF_DECODER + "embed_positions.weight"].clone()
    for hp, mp in rank.layers(HF_LAYER_PREFIX):
        for kind in ("weight", "bias"):
            q, k, v = (hf_sd[f"{hp}self_attn.{n}_proj.{kind}"] for n in "qkv")
            gate = _fused_gate(tensors, kind)  # megatron's rows per head: q (gate) k v
            parts = (q, k, v) if gate is None else (q, extras[hp + HF_ATTENTION + gate.hf], k, v)
            out[f"{mp}self_attention.linear_qkv.{kind}"] = rank.cut(_fuse_qkv(parts, H))
            out[f"{mp}mlp.linear_fc1.{kind}"] = rank.cut(hf_sd[f"{hp}fc1.{kind}"])
            for hf_ln, mg_ln in _layer_norms(arch):
                out[f"{mp}{mg_ln}.{kind}"] = hf_sd[f"{hp}{hf_ln}.{kind}"].clone()
        out[f"{mp}self_attention.linear_proj.weight"] = rank.cut(hf_sd[f"{hp}self_attn.out_proj.weight"], 1)
        out[f"{mp}mlp.linear_fc2.weight"] = rank.cut(hf_sd[f"{hp}fc2.weight"], 1)
        # Row-parallel biases: the full bias on every rank (megatron adds it after the all-reduce).
        out[f"{mp}self_attention.linear_proj.bias"] = hf_sd[f"{hp}self_attn.out_proj.bias"].clone()
        out[f"{mp}mlp.linear_fc2.bias"] = hf_sd[f"{hp}fc2.bias"].clone()
        out.update(rank.variant_shards(hp, mp))
    if last:
        if arch.do_layer_norm_before:
            for kind in ("weight", "bias"):
                out[f"decoder.final_layernorm.{kind}"] = hf_sd[f"{HF_DECODER}final_layer_norm.{kind}"].clone()
        if projected:
            out[MG_PROJECT_OUT] = hf_sd[HF_PROJECT_OUT].clone()
        if rank.pp_size > 1:
            # Tied head on a stage without the embedding: megatron keeps a synchronised copy.
            out["output_layer.weight"] = word.clone() if first else word
    return out


def _check_variant_state(extras: Mapping[str, torch.Tensor], arch, variant) -> tuple:
    """The variant's tensor descriptions, after checking that ``extras`` holds exactly its tensors (names and
    full shapes, every layer). One-line OutEffError naming the first unknown, missing or misshapen tensor.
    Any model family (``arch``'s mapping, models/family.py: its ``variant_tensors_of`` and ``variant_hf_shapes``)."""
    from megatron_outeff.models.family import family_of
    from megatron_outeff.ops.variants import AttentionVariantConfig

    mapping = family_of(arch).hf
    tensors = mapping.variant_tensors_of(arch, variant)
    expected = mapping.variant_hf_shapes(arch, variant)
    variant = AttentionVariantConfig.from_dict(variant)
    unknown = [k for k in extras if k not in expected]
    if unknown:
        raise OutEffError(
            f"{unknown[0]}: not a tensor of the attention variant {variant.describe()!r} of {arch.name}, "
            f"whose layers hold {[HF_ATTENTION + t.hf for t in tensors]}"
        )
    missing = [k for k in expected if k not in extras]
    if missing:
        raise OutEffError(
            f"{len(missing)} tensor(s) of the attention variant {variant.describe()!r} missing, e.g. {missing[:3]}"
        )
    for k, shape in expected.items():
        if tuple(extras[k].shape) != shape:
            raise OutEffError(f"{k}: shape {tuple(extras[k].shape)}, expected {shape} for {arch.name}")
    return tensors


def load_megatron_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], allow_missing: Sequence[str] = ()
) -> None:
    """``model.load_state_dict`` that tolerates only megatron's weightless ``_extra_state`` entries
    (and keys matching the regexes in ``allow_missing``, e.g. a variant's extra parameters) missing."""
    result = model.load_state_dict(dict(state_dict), strict=False)
    missing = [
        k
        for k in result.missing_keys
        if not k.endswith("._extra_state") and not any(re.search(p, k) for p in allow_missing)
    ]
    if missing or result.unexpected_keys:
        raise OutEffError(
            f"state dict does not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


# --------------------------------------------------------------------------------------------
# megatron ranks -> Hugging Face.


def _strip_wrappers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP / Float16Module 'module.' prefixes and megatron's weightless _extra_state entries."""
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module.") :]
        if k.endswith("._extra_state"):
            continue
        out[k] = v
    return out


def _as_grid(rank_state_dicts) -> list[list[dict]]:
    """{(tp_rank, pp_rank): sd} or [pp][tp] nested sequences -> grid[pp][tp]."""
    if isinstance(rank_state_dicts, Mapping):
        keys = list(rank_state_dicts)
        if not keys or not all(isinstance(k, tuple) and len(k) == 2 for k in keys):
            raise OutEffError(
                "rank_state_dicts: expected a mapping {(tp_rank, pp_rank): state_dict} or a [pp][tp] list"
            )
        tp = max(k[0] for k in keys) + 1
        pp = max(k[1] for k in keys) + 1
        if len(keys) != tp * pp:
            raise OutEffError(f"rank_state_dicts: {len(keys)} ranks given, expected all {tp} x {pp} (tp x pp)")
        return [[_strip_wrappers(rank_state_dicts[(t, p)]) for t in range(tp)] for p in range(pp)]
    grid = [list(row) for row in rank_state_dicts]
    if not grid or any(len(row) != len(grid[0]) or not row for row in grid):
        raise OutEffError("rank_state_dicts: expected a non-empty [pp][tp] list with the same tp count per stage")
    return [[_strip_wrappers(sd) for sd in row] for row in grid]


class _RankGrid:
    """Every model-parallel rank's megatron state dict (``_as_grid``: grid[pp][tp]) read by name, keeping
    track of what was read so that what has no Hugging Face counterpart can be refused (``check_all_read``)."""

    def __init__(self, rank_state_dicts):
        self.grid = _as_grid(rank_state_dicts)
        self.pp_size, self.tp_size = len(self.grid), len(self.grid[0])
        self.used: list[list[set]] = [[set() for _ in row] for row in self.grid]

    def take(self, p: int, t: int, key: str) -> torch.Tensor:
        sd = self.grid[p][t]
        if key not in sd:
            raise OutEffError(f"megatron state dict of tp_rank={t}, pp_rank={p} lacks {key!r}")
        self.used[p][t].add(key)
        return sd[key]

    def cat(self, p: int, key: str, dim: int = 0) -> torch.Tensor:
        """The TP shards of stage ``p``'s ``key`` concatenated along ``dim``."""
        return torch.cat([self.take(p, t, key) for t in range(self.tp_size)], dim=dim)

    def replicated(self, p: int, key: str) -> torch.Tensor:
        for t in range(1, self.tp_size):
            self.take(p, t, key)  # present on every rank; one logical copy, read from TP rank 0
        return self.take(p, 0, key).clone()

    def variant_tensor(self, p: int, key: str, t) -> torch.Tensor:
        """A variant tensor ``t`` (ops.variants.variant_tensors) whole: its TP shards joined along ``tp_dim``."""
        return self.replicated(p, key) if t.tp_dim is None else self.cat(p, key, t.tp_dim)

    def check_all_read(self, label: str) -> None:
        """One-line OutEffError naming the tensors no mapping read (they have no ``label`` counterpart)."""
        for p in range(self.pp_size):
            for t in range(self.tp_size):
                left = sorted(set(self.grid[p][t]) - self.used[p][t])
                if left:
                    raise OutEffError(
                        f"megatron tensors without a Hugging Face {label} counterpart on tp_rank={t}, pp_rank={p}: "
                        f"{left[:3]} (pass strict=False to drop them)"
                    )


def megatron_to_hf_state_dict(
    rank_state_dicts, arch: Union[OPTArchConfig, str], *, strict: bool = True, variant=None
) -> dict[str, torch.Tensor]:
    """The full Hugging Face OPTForCausalLM state dict (``lm_head.weight`` included, tied to the
    embedding) from every model-parallel rank's megatron state dict.

    rank_state_dicts: {(tp_rank, pp_rank): state_dict} or a nested [pp][tp] list, e.g. sharded
    checkpoints read by a single-process tool or the result of :func:`gather_megatron_state_dicts`.
    strict: refuse megatron tensors with no Hugging Face OPT counterpart (e.g. a softmax variant's
    learnable offsets or gates), instead of dropping them.
    variant: the attention variant (``AttentionVariantConfig``) of the ranks: its tensors
    (``ops.variants.variant_tensors``: learnable offsets, gates; TP shards concatenated along their
    ``tp_dim``) are mapped too and appended, in their Hugging Face names, after the OPT tensors.
    """
    arch = load_arch_config(arch)
    ranks = _RankGrid(rank_state_dicts)
    pp_size, cat, replicated = ranks.pp_size, ranks.cat, ranks.replicated
    check_parallel_layout(arch, ranks.tp_size, pp_size)

    H, V = arch.num_attention_heads, arch.vocab_size
    tensors = () if variant is None else opt_variant_tensors(arch, variant)
    hf: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    embed = cat(0, "embedding.word_embeddings.weight", 0)
    if embed.shape[0] < V:
        raise OutEffError(f"megatron word embeddings have {embed.shape[0]} rows, fewer than vocab_size={V}")
    embed = embed[:V].clone()
    hf[HF_DECODER + "embed_tokens.weight"] = embed
    hf[HF_DECODER + "embed_positions.weight"] = replicated(0, "embedding.position_embeddings.weight")
    if arch.embed_dim != arch.hidden_size:
        hf[HF_PROJECT_IN] = replicated(0, MG_PROJECT_IN)
        hf[HF_PROJECT_OUT] = replicated(pp_size - 1, MG_PROJECT_OUT)
    if pp_size > 1:
        head = cat(pp_size - 1, "output_layer.weight", 0)[:V]
        if not torch.equal(head, embed):
            raise OutEffError(
                "output_layer.weight on the last pipeline stage differs from the word embeddings; expected tied copies"
            )
    per_stage = arch.num_layers // pp_size
    for p in range(pp_size):
        for local in range(per_stage):
            hp, mp = f"{HF_DECODER}layers.{p * per_stage + local}.", f"decoder.layers.{local}."
            for kind in ("weight", "bias"):
                gate = _fused_gate(tensors, kind)
                parts = _unfuse_qkv(cat(p, f"{mp}self_attention.linear_qkv.{kind}", 0), H, 3 if gate is None else 4)
                if gate is not None:
                    extras[hp + HF_ATTENTION + gate.hf] = parts[1]
                q, k, v = parts[0], parts[-2], parts[-1]
                hf[f"{hp}self_attn.q_proj.{kind}"] = q
                hf[f"{hp}self_attn.k_proj.{kind}"] = k
                hf[f"{hp}self_attn.v_proj.{kind}"] = v
            hf[f"{hp}self_attn.out_proj.weight"] = cat(p, f"{mp}self_attention.linear_proj.weight", 1)
            hf[f"{hp}self_attn.out_proj.bias"] = replicated(p, f"{mp}self_attention.linear_proj.bias")
            for kind in ("weight", "bias"):
                for hf_ln, mg_ln in _layer_norms(arch):
                    hf[f"{hp}{hf_ln}.{kind}"] = replicated(p, f"{mp}{mg_ln}.{kind}")
                hf[f"{hp}fc1.{kind}"] = cat(p, f"{mp}mlp.linear_fc1.{kind}", 0)
            hf[f"{hp}fc2.weight"] = cat(p, f"{mp}mlp.linear_fc2.weight", 1)
            hf[f"{hp}fc2.bias"] = replicated(p, f"{mp}mlp.linear_fc2.bias")
            for t in (t for t in tensors if not t.fused_qkv):
                extras[hp + HF_ATTENTION + t.hf] = ranks.variant_tensor(p, mp + MG_ATTENTION + t.megatron, t)
    if arch.do_layer_norm_before:
        for kind in ("weight", "bias"):
            hf[f"{HF_DECODER}final_layer_norm.{kind}"] = replicated(pp_size - 1, f"decoder.final_layernorm.{kind}")
    if strict:
        ranks.check_all_read("OPT")
    # Order as OPTForCausalLM.state_dict(); the head is the embedding itself (tied).
    ordered = {k: hf[k] for k in hf_expected_shapes(arch)}
    ordered[HF_LM_HEAD] = embed
    ordered.update(extras)
    return ordered


def gather_megatron_state_dicts(
    model: Optional[torch.nn.Module] = None, state_dict: Optional[Mapping] = None
) -> dict[tuple[int, int], dict]:
    """{(tp_rank, pp_rank): CPU state dict} of every rank of this rank's model-parallel group
    (collective over that group; every member gets the result). Small and medium models only:
    every rank holds a full copy. ``state_dict`` instead of ``model``: any per-rank mapping with the
    model's keys (e.g. parameter gradients)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if (model is None) == (state_dict is None):
        raise OutEffError("gather_megatron_state_dicts: pass exactly one of model and state_dict")
    src = model.state_dict() if model is not None else state_dict
    sd = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in src.items()}
    mine = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(), sd)
    group = ps.get_model_parallel_group()
    allv = [None] * dist.get_world_size(group=group)
    dist.all_gather_object(allv, mine, group=group)
    return {(t, p): s for t, p, s in allv}


# --------------------------------------------------------------------------------------------
# Directories (config.json + model.safetensors).


def load_hf_opt_dir(
    path: Union[str, Path], expected_arch: Union[OPTArchConfig, str, None] = None
) -> tuple[OPTArchConfig, dict[str, torch.Tensor]]:
    """(architecture, state dict) of a Hugging Face OPT directory: config.json + *.safetensors only.

    Validates model_type, (optionally) the architecture against ``expected_arch``, and the tensors,
    before returning anything.
    """
    return load_hf_dir(path, "opt", expected_arch)


def load_hf_dir(path: Union[str, Path], family: str, expected_arch=None) -> tuple:
    """(architecture, state dict) of a Hugging Face directory of ``family`` (models/family.py; its mapping's
    ``arch_from_hf_config``, ``check_same_architecture``, ``validate_hf_state_dict``): config.json +
    *.safetensors only, everything validated before returning."""
    from megatron_outeff.models.family import get_family

    mapping = get_family(family).hf
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise OutEffError(f"{path}: no config.json; expected a Hugging Face model directory")
    with open(cfg_path) as f:
        cfg = json.load(f)
    arch = mapping.arch_from_hf_config(cfg, name=path.name or None)
    if expected_arch is not None:
        mapping.check_same_architecture(arch, mapping.load_arch_config(expected_arch), what=str(path))
    sd = read_hf_safetensors(path)
    mapping.validate_hf_state_dict(sd, arch)
    return arch, sd


SAFETENSORS_INDEX = "model.safetensors.index.json"


def check_hf_safetensors(path: Union[str, Path]) -> list[Path]:
    """The ``*.safetensors`` shards of a Hugging Face directory, every one checked readable (header and
    size, without loading tensors) and, with a ``model.safetensors.index.json``, the index valid JSON
    whose weight_map names exactly the shards present. One-line ValueError naming the bad file."""
    import json

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise OutEffError(f"{path}: no *.safetensors weights (pickled .bin checkpoints are not read)")
    index = path / SAFETENSORS_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            named = set(weight_map.values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise OutEffError(
                f"{index}: not a valid safetensors index (expected JSON with a weight_map: "
                f"{' '.join(str(e).split()) or type(e).__name__})"
            ) from None
        if named != {f.name for f in files}:
            raise OutEffError(
                f"{index}: names shards {sorted(named)[:3]}, the directory holds {[f.name for f in files][:3]}"
            )
    for fp in files:
        check_readable(fp)
    return files


def read_hf_safetensors(path: Union[str, Path], on_file=None) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory's ``*.safetensors`` shards (never pickled ``.bin``),
    keyed under the ``model.decoder.`` prefix. ``on_file(name)`` is called before each shard is read."""
    files = check_hf_safetensors(path)
    sd: dict[str, torch.Tensor] = {}
    for fp in files:
        if on_file is not None:
            on_file(fp.name)
        part = load_tensors(fp)
        dup = set(part) & set(sd)
        if dup:
            raise OutEffError(f"{fp}: tensor(s) {sorted(dup)[:3]} appear in more than one safetensors file")
        sd.update(part)
    # save_pretrained stores the checkpoint under the base-model prefix when saved from OPTModel.
    if not any(k.startswith(HF_DECODER) for k in sd) and any(k.startswith("decoder.") for k in sd):
        sd = {("model." + k if k.startswith("decoder.") else k): v for k, v in sd.items()}
    return sd


def save_hf_opt_dir(
    path: Union[str, Path], arch: Union[OPTArchConfig, str], state_dict: Mapping[str, torch.Tensor]
) -> Path:
    """Write config.json + model.safetensors loadable by ``OPTForCausalLM.from_pretrained(path)``.

    ``path`` must not exist or be an empty directory: nothing is ever overwritten. Files are written
    to a temporary sibling directory first and renamed into place, so a failure leaves no partial model.
    """
    from safetensors.torch import save_file
    from transformers import OPTConfig

    arch = load_arch_config(arch)
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise OutEffError(f"{path}: exists and is not an empty directory; refusing to overwrite")
    validate_hf_state_dict(state_dict, arch)
    dtypes = {t.dtype for t in state_dict.values()}
    config = OPTConfig(**hf_config_dict(arch, dtype=dtypes.pop() if len(dtypes) == 1 else None))
    config.architectures = ["OPTForCausalLM"]
    # The head is tied to the embedding: store it once, as save_pretrained does.
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k != HF_LM_HEAD}
    with atomic_output_dir(path) as tmp:
        config.to_json_file(str(tmp / "config.json"))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return path


# --------------------------------------------------------------------------------------------
# Conveniences on a live (distributed) megatron model.


def _variant_param_patterns() -> tuple:
    from megatron_outeff.ops.variants import variant_tensor_owners

    return tuple(r"\." + re.escape(MG_ATTENTION + name) + "$" for name in variant_tensor_owners("megatron"))


# Parameters of megatron_outeff's attention variants that Hugging Face OPT has no counterpart for
# (``ops.variants.variant_tensors``): after an import they keep their initialisation.
VARIANT_PARAM_PATTERNS = _variant_param_patterns()


def load_hf_opt_into_model(
    model: torch.nn.Module, hf: Union[str, Path, Mapping[str, torch.Tensor]], arch: Union[OPTArchConfig, str], **options
) -> None:
    """Load a Hugging Face OPT (directory or state dict) into this rank's ``build_opt_model`` model:
    ``load_hf_into_model`` (``options``: allow_missing)."""
    load_hf_into_model(model, hf, load_arch_config(arch), **options)


def load_hf_into_model(
    model: torch.nn.Module,
    hf: Union[str, Path, Mapping[str, torch.Tensor]],
    arch,
    *,
    allow_missing: Iterable[str] = VARIANT_PARAM_PATTERNS,
) -> None:
    """Load a Hugging Face model of ``arch``'s family (directory or state dict) into this rank's megatron model
    (the family's ``build_model``), using megatron's parallel_state for this rank's (TP, PP) position; the
    variant's own tensors (``allow_missing``) keep their initialisation."""
    from megatron_outeff.models.family import family_of

    hf_sd = hf if isinstance(hf, Mapping) else load_hf_dir(hf, arch.family, expected_arch=arch)[1]
    vocab_rows = None
    if getattr(model, "pre_process", True) and hasattr(model, "embedding"):
        vocab_rows = model.embedding.word_embeddings.num_embeddings  # the model's own (padded) size
    sd = family_of(arch).hf.hf_state_dict_to_megatron(
        hf_sd, arch, *this_rank_layout(), vocab_size=vocab_rows or getattr(model, "vocab_size", None)
    )
    load_megatron_state_dict(model, sd, tuple(allow_missing))


def this_rank_layout() -> tuple[int, int, int, int]:
    """(tp_rank, tp_size, pp_rank, pp_size) of this rank in megatron's parallel_state: the positional
    layout arguments of ``hf_state_dict_to_megatron``."""
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_rank(),
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size(),
    )


def megatron_model_to_hf_state_dict(
    model: torch.nn.Module, arch: Union[OPTArchConfig, str], *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Gather this model-parallel group's shards and convert them (collective; every member gets it)."""
    return megatron_to_hf_state_dict(gather_megatron_state_dicts(model), arch, strict=strict)
