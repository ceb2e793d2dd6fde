"""Lossless Hugging Face Llama <-> megatron-core Llama (``build_llama_model``) weight mapping at any TP/PP.

Layouts (H query heads and G key/value heads of width d, hidden h, SwiGLU width F, per TP rank r of T,
per PP stage p of P):

* ``linear_qkv`` (column parallel, no bias): megatron fuses Q, K, V per query group (grouped-query
  attention): the rows are, for each group g = 0..G-1, its H/G query heads, then k_g, then v_g, d
  rows each ([q_0 .. q_{H/G-1} k_0 v_0 | q_{H/G} .. k_1 v_1 | ...]; megatron's SelfAttention views the
  output as [.., G, (H/G + 2) * d] and splits it q | k | v). Query head j belongs to group j // (H/G),
  as in transformers' ``repeat_kv``. Rank r holds groups r*G/T .. (r+1)*G/T - 1: a contiguous row block
  (T must divide G). With G = H this is OPT's per-head [q_j k_j v_j] layout.
* ``linear_fc1`` (column parallel): SwiGLU's gate and up projections in one matrix; megatron's GLU
  splits each rank's OUTPUT in two halves (act(first) * second), so rank r holds
  [gate rows of rank r; up rows of rank r] and the TP=1 matrix is [gate; up].
* ``linear_proj`` (= o_proj) and ``linear_fc2`` (= down_proj, row parallel): column blocks.
* RMSNorm weights (``input_layernorm`` <-> ``input_layernorm``, ``post_attention_layernorm`` <->
  ``pre_mlp_layernorm``, ``model.norm`` <-> ``decoder.final_layernorm``): replicated.
* Word embeddings and the (untied) LM head: the vocabulary is zero-padded to ``padded_vocab_size`` rows
  and split by rows across TP; export concatenates and drops the padding rows. The embedding lives on
  stage 0, the output layer and final norm on stage P-1.
* RoPE has no weights (megatron's ``rotary_interleaved=False`` is transformers' ``rotate_half``:
  models/llama.py), so no q / k row permutation either way.
* Attention-variant tensors: exactly those of ``ops.variants.variant_tensors`` (``llama_variant_tensors``:
  learnable ``softmax_offset``, per-head gate tensors, split by query head along their ``tp_dim``; the
  elementwise gate's ``self_attn.gate_proj.weight`` rows fused into ``linear_qkv`` per key/value group
  [its query heads | their gate rows | k | v], megatron-core's ``attention_output_gate`` layout), under
  ``model.layers.N.self_attn.`` / ``decoder.layers.N.self_attention.``.

Reads config.json + safetensors only (never pickles). Every check runs before any weight is touched.
Errors: one-line ``OutEffError``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from megatron_outeff.errors import OutEffError

# Family-neutral helpers shared with the OPT mapping (state-dict plumbing, no OPT names).
from .hf_opt import (  # noqa: F401  (re-exported: the family interface)
    HF_ATTENTION,
    MG_ATTENTION,
    VARIANT_PARAM_PATTERNS,
    RankImport,
    _RankGrid,
    arch_variant_tensors,
    check_hf_safetensors,
    check_hf_shapes,
    check_structural_fields,
    gather_megatron_state_dicts,
    hf_config_with,
    hf_to_megatron,
    layer_variant_shapes,
    load_hf_dir,
    load_hf_into_model,
    load_megatron_state_dict,
    read_hf_safetensors,
    this_rank_layout,
)
from .hf_opt import split_variant_state as split_opt_variant_state
from .llama import LlamaArchConfig, check_parallel_layout, load_arch_config

HF_MODEL = "model."
HF_LAYER_PREFIX = "model.layers."
HF_EMBED = "model.embed_tokens.weight"
HF_NORM = "model.norm.weight"
HF_LM_HEAD = "lm_head.weight"
MG_EMBED, MG_HEAD, MG_NORM = "embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight"
# {megatron vocabulary-parallel tensor: the megatron key of the full padded tensor it is cut from} (family.py)
VOCAB_PARALLEL = {MG_EMBED: MG_EMBED, MG_HEAD: MG_HEAD}

# Architecture fields a checkpoint must agree on with the target (dropouts and init do not matter).
STRUCTURAL_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "query_groups",
    "ffn_hidden_size",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rope_scaling_factor",
    "layernorm_epsilon",
)

# Per layer: (HF name under model.layers.N., megatron name under decoder.layers.N.) of the RMSNorms.
_LAYER_NORMS = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
)
_HF_VARIANT_RE = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(.+)$")


# --------------------------------------------------------------------------------------------
# The attention variant's tensors: ops.variants.variant_tensors, the one description (names inside the
# attention module on both sides, shapes, TP split, fused linear_qkv rows); the Llama mapping iterates it.


def llama_variant_tensors(arch: LlamaArchConfig, variant) -> tuple:
    """The tensors ``variant`` adds to each attention layer of ``arch`` (``ops.variants.variant_tensors``): per
    query head, also under grouped-query attention; the elementwise gate without a bias (Llama's projections
    have none). One-line OutEffError for a gate the architecture cannot have."""
    return arch_variant_tensors(arch, variant, qkv_bias=False)


variant_tensors_of = llama_variant_tensors  # the family interface (models/family.py)


def variant_hf_shapes(arch: LlamaArchConfig, variant) -> dict[str, tuple]:
    """{Hugging Face name: full shape} of every variant tensor of every layer, in layer order."""
    return layer_variant_shapes(llama_variant_tensors(arch, variant), arch.num_layers, HF_LAYER_PREFIX)


def split_variant_state(hf_sd: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """(standard Llama tensors, attention-variant tensors) of a Hugging Face state dict (``hf_opt``'s rule at
    Llama's layers)."""
    return split_opt_variant_state(hf_sd, _HF_VARIANT_RE)


def _fused_gate(tensors):
    """The variant's tensor fused into linear_qkv's weight (the elementwise gate's rows), or None."""
    return next((t for t in tensors if t.fused_qkv and t.megatron == "linear_qkv.weight"), None)


# --------------------------------------------------------------------------------------------
# Config translation.


# Hugging Face LlamaConfig key -> the LlamaArchConfig field it holds: the one name mapping both directions
# use. RoPE (rope_parameters) is translated separately; hidden_dropout has no Hugging Face counterpart.
HF_CONFIG_KEYS = {
    "num_hidden_layers": "num_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_query_groups",
    "intermediate_size": "ffn_hidden_size",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "layernorm_epsilon",
    "attention_dropout": "attention_dropout",
    "initializer_range": "init_method_std",
}
# megatron-core's fixed "llama3" RoPE scaling parameters (RotaryEmbedding._apply_scaling's defaults).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def arch_from_hf_config(cfg: Mapping, name: Optional[str] = None) -> LlamaArchConfig:
    """LlamaArchConfig of a Hugging Face Llama config.json mapping (one-line OutEffError for anything our
    megatron Llama cannot represent). Parsed by transformers' own LlamaConfig, which also reads the older
    ``rope_theta`` / ``rope_scaling`` keys into ``rope_parameters``."""
    from transformers import LlamaConfig

    mt = cfg.get("model_type")
    if mt != "llama":
        raise OutEffError(f"config.json model_type={mt!r}: expected 'llama'")
    try:
        c = LlamaConfig.from_dict({k: v for k, v in cfg.items() if k not in ("architectures", "auto_map")})
    except (TypeError, ValueError) as e:
        raise OutEffError(f"config.json: not a valid Llama config ({' '.join(str(e).split())[:200]})") from None
    for key, want in (
        ("hidden_act", "silu"),
        ("attention_bias", False),
        ("mlp_bias", False),
        ("tie_word_embeddings", False),
        ("head_dim", c.hidden_size // c.num_attention_heads),
    ):
        if getattr(c, key, want) != want:
            raise OutEffError(
                f"config.json {key}={getattr(c, key)!r}: expected {want!r} (our megatron Llama: SwiGLU, "
                "no biases, untied LM head, head_dim = hidden_size / num_attention_heads)"
            )
    rope = dict(c.rope_parameters or {})
    kind = rope.get("rope_type", "default")
    scaling = None
    if kind == "llama3":
        for key, want in MEGATRON_LLAMA3_ROPE.items():
            if float(rope.get(key, -1)) != want:
                raise OutEffError(
                    f"config.json rope {key}={rope.get(key)!r}: megatron-core's llama3 RoPE scaling fixes it at {want}"
                )
        scaling = float(rope["factor"])
    elif kind != "default":
        raise OutEffError(f"config.json rope_type={kind!r}: expected 'default' or 'llama3'")
    if name is None:
        name = Path(str(cfg.get("_name_or_path") or "")).name or f"llama-hf-{c.num_hidden_layers}x{c.hidden_size}"
    fields = {ours: getattr(c, key) for key, ours in HF_CONFIG_KEYS.items()}
    for f in ("layernorm_epsilon", "attention_dropout", "init_method_std"):
        fields[f] = float(fields[f])
    return LlamaArchConfig(
        name=name,
        rope_theta=float(rope.get("rope_theta", 10000.0)),
        rope_scaling_factor=scaling,
        hidden_dropout=0.0,
        **fields,
    )


def hf_config_dict(arch: Union[LlamaArchConfig, str], dtype: Optional[torch.dtype] = None) -> dict:
    """Keyword arguments of transformers.LlamaConfig describing ``arch``."""
    arch = load_arch_config(arch)
    d = {key: getattr(arch, ours) for key, ours in HF_CONFIG_KEYS.items()}
    d["num_key_value_heads"] = arch.query_groups
    rope = {"rope_type": "default", "rope_theta": float(arch.rope_theta)}
    if arch.rope_scaling_factor is not None:
        rope.update(rope_type="llama3", factor=float(arch.rope_scaling_factor), **MEGATRON_LLAMA3_ROPE)
    fixed = dict(hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
    return hf_config_with(d, dtype, rope_parameters=rope, head_dim=arch.head_dim, **fixed)


def check_same_architecture(got: LlamaArchConfig, expected: LlamaArchConfig, what: str = "checkpoint") -> None:
    if getattr(expected, "family", None) != got.family:
        raise OutEffError(
            f"{what} is a {got.family} model ({got.name}); expected {expected.name}, a "
            f"{getattr(expected, 'family', type(expected).__name__)} model"
        )
    check_structural_fields(got, expected, STRUCTURAL_FIELDS, what)


# --------------------------------------------------------------------------------------------
# Hugging Face state dict: expected shapes and validation.


def hf_expected_shapes(arch: LlamaArchConfig) -> dict[str, tuple]:
    """{name: shape} of LlamaForCausalLM's state dict (lm_head.weight included), in its order."""
    h, f, v, d = arch.hidden_size, arch.ffn_hidden_size, arch.vocab_size, arch.head_dim
    H, G = arch.num_attention_heads, arch.query_groups
    shapes = {HF_EMBED: (v, h)}
    for i in range(arch.num_layers):
        p = f"{HF_LAYER_PREFIX}{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (H * d, h),
                p + "self_attn.k_proj.weight": (G * d, h),
                p + "self_attn.v_proj.weight": (G * d, h),
                p + "self_attn.o_proj.weight": (h, H * d),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
        for hf_ln, _ in _LAYER_NORMS:
            shapes[p + hf_ln] = (h,)
    shapes[HF_NORM] = (h,)
    shapes[HF_LM_HEAD] = (v, h)
    return shapes


def validate_hf_state_dict(hf_sd: Mapping[str, torch.Tensor], arch: LlamaArchConfig) -> None:
    """One-line OutEffError unless ``hf_sd`` is exactly a standard Llama of architecture ``arch`` (RoPE's
    ``rotary_emb.inv_freq`` buffers, which older conversions saved, are derived from rope_theta, not weights:
    ignored here and never read, as transformers ignores them)."""
    check_hf_shapes(hf_sd, hf_expected_shapes(arch), arch, ignored=lambda k: k.endswith("rotary_emb.inv_freq"))


# --------------------------------------------------------------------------------------------
# Layout helpers.


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, gate: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """q [H*d, ...], k / v [G*d, ...] -> megatron's grouped rows [(H + 2G)*d, ...] (module doc). With
    ``gate`` [H*d, ...] (megatron's ``attention_output_gate``, the elementwise output gate) each group's
    block is [its query heads, their gate rows, k, v]: [(2H + 2G)*d, ...] (megatron's SelfAttention
    ``get_query_key_value_tensors`` splits q | gate | k | v per group)."""
    d, rest, per = q.shape[0] // heads, q.shape[1:], heads // groups
    parts = [q.reshape(groups, per, d, *rest)]
    if gate is not None:
        parts.append(gate.reshape(groups, per, d, *rest))
    parts += [k.reshape(groups, 1, d, *rest), v.reshape(groups, 1, d, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def unfuse_qkv(qkv: torch.Tensor, heads: int, groups: int, gate: bool = False) -> tuple[torch.Tensor, ...]:
    """The inverse of :func:`fuse_qkv`: (q, k, v), or (q, gate, k, v) with ``gate``."""
    per = heads // groups
    width = 2 * per + 2 if gate else per + 2
    d, rest = qkv.shape[0] // (groups * width), qkv.shape[1:]
    g = qkv.reshape(groups, width, d, *rest)
    blocks = [g[:, :per]] + ([g[:, per : 2 * per]] if gate else []) + [g[:, width - 2 : width - 1], g[:, width - 1 :]]
    return tuple(b.reshape(-1, *rest).contiguous() for b in blocks)


# --------------------------------------------------------------------------------------------
# Hugging Face -> one megatron rank.


def hf_state_dict_to_megatron(hf_sd: Mapping[str, torch.Tensor], arch: Union[LlamaArchConfig, str], *layout, **options):
    """The state dict of one (tp_rank, pp_rank) megatron Llama model (``build_llama_model``) from a full
    Hugging Face LlamaForCausalLM state dict: ``hf_opt.hf_to_megatron`` (``layout``: tp_rank, tp_size,
    pp_rank, pp_size; ``options``: vocab_size, default ``padded_vocab_size(arch.vocab_size, tp_size)``, and
    variant, whose tensors ``hf_sd`` holds: exactly those of ``llama_variant_tensors`` for every layer).
    Returned tensors are fresh copies (load them with ``load_megatron_state_dict``)."""
    return hf_to_megatron(hf_sd, load_arch_config(arch), *layout, **options)


def megatron_rank_state_dict(rank: RankImport) -> dict[str, torch.Tensor]:
    """``hf_to_megatron``'s Llama layout (module doc)."""
    arch, hf_sd, extras, cut = rank.arch, rank.hf_sd, rank.extras, rank.cut
    gate = _fused_gate(rank.tensors)
    H, G = arch.num_attention_heads, arch.query_groups
    out: dict[str, torch.Tensor] = {}
    if rank.first:
        out[MG_EMBED] = rank.embedding(HF_EMBED)
    for hp, mp in rank.layers(HF_LAYER_PREFIX):
        q, k, v = (hf_sd[f"{hp}self_attn.{n}_proj.weight"] for n in "qkv")
        gate_rows = None if gate is None else extras[hp + HF_ATTENTION + gate.hf]
        out[mp + "self_attention.linear_qkv.weight"] = cut(fuse_qkv(q, k, v, H, G, gate=gate_rows))
        out[mp + "self_attention.linear_proj.weight"] = cut(hf_sd[hp + "self_attn.o_proj.weight"], 1)
        out[mp + "mlp.linear_fc1.weight"] = torch.cat(
            [cut(hf_sd[hp + "mlp.gate_proj.weight"]), cut(hf_sd[hp + "mlp.up_proj.weight"])]
        )
        out[mp + "mlp.linear_fc2.weight"] = cut(hf_sd[hp + "mlp.down_proj.weight"], 1)
        for hf_ln, mg_ln in _LAYER_NORMS:
            out[mp + mg_ln] = hf_sd[hp + hf_ln].clone()
        out.update(rank.variant_shards(hp, mp))
    if rank.last:
        out[MG_NORM] = hf_sd[HF_NORM].clone()
        out[MG_HEAD] = rank.embedding(HF_LM_HEAD)
    return out


# --------------------------------------------------------------------------------------------
# megatron ranks -> Hugging Face.


def megatron_to_hf_state_dict(
    rank_state_dicts, arch: Union[LlamaArchConfig, str], *, strict: bool = True, variant=None
) -> dict[str, torch.Tensor]:
    """The full Hugging Face LlamaForCausalLM state dict from every model-parallel rank's megatron state
    dict ({(tp_rank, pp_rank): sd} or a [pp][tp] list). ``strict``: refuse megatron tensors with no Hugging
    Face Llama counterpart (e.g. a variant's offsets or gates) instead of dropping them.
    ``variant``: the attention variant of the ranks: its tensors (``llama_variant_tensors``; TP shards
    concatenated along their ``tp_dim``, the elementwise gate's rows taken out of linear_qkv) are mapped
    too and appended, in their Hugging Face names, after the Llama tensors."""
    arch = load_arch_config(arch)
    ranks = _RankGrid(rank_state_dicts)
    pp_size, tp_size, take, cat, replicated = ranks.pp_size, ranks.tp_size, ranks.take, ranks.cat, ranks.replicated
    check_parallel_layout(arch, tp_size, pp_size)

    H, G, V = arch.num_attention_heads, arch.query_groups, arch.vocab_size
    tensors = () if variant is None else llama_variant_tensors(arch, variant)
    gate = _fused_gate(tensors)
    hf: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for key, name, p in ((HF_EMBED, MG_EMBED, 0), (HF_LM_HEAD, MG_HEAD, pp_size - 1)):
        full = cat(p, name)
        if full.shape[0] < V:
            raise OutEffError(f"megatron {name} has {full.shape[0]} rows, fewer than vocab_size={V}")
        hf[key] = full[:V].clone()
    hf[HF_NORM] = replicated(pp_size - 1, MG_NORM)
    per_stage = arch.num_layers // pp_size
    for p in range(pp_size):
        for local in range(per_stage):
            hp, mp = f"{HF_LAYER_PREFIX}{p * per_stage + local}.", f"decoder.layers.{local}."
            qkv = cat(p, mp + "self_attention.linear_qkv.weight")
            rows = (H + 2 * G + (H if gate is not None else 0)) * arch.head_dim
            if qkv.shape[0] != rows:  # e.g. the elementwise gate's rows, read without its variant
                raise OutEffError(
                    f"{mp}self_attention.linear_qkv.weight has {qkv.shape[0]} rows, expected {rows} for "
                    f"{arch.name} ({'with' if gate is not None else 'without'} the elementwise gate's rows)"
                )
            parts = unfuse_qkv(qkv, H, G, gate=gate is not None)
            q, k, v = parts[0], parts[-2], parts[-1]
            if gate is not None:
                extras[hp + HF_ATTENTION + gate.hf] = parts[1]
            hf.update(
                {
                    hp + "self_attn.q_proj.weight": q,
                    hp + "self_attn.k_proj.weight": k,
                    hp + "self_attn.v_proj.weight": v,
                }
            )
            hf[hp + "self_attn.o_proj.weight"] = cat(p, mp + "self_attention.linear_proj.weight", 1)
            halves = [take(p, t, mp + "mlp.linear_fc1.weight").chunk(2) for t in range(tp_size)]
            hf[hp + "mlp.gate_proj.weight"] = torch.cat([gate for gate, _ in halves])
            hf[hp + "mlp.up_proj.weight"] = torch.cat([up for _, up in halves])
            hf[hp + "mlp.down_proj.weight"] = cat(p, mp + "mlp.linear_fc2.weight", 1)
            for hf_ln, mg_ln in _LAYER_NORMS:
                hf[hp + hf_ln] = replicated(p, mp + mg_ln)
            for t in (t for t in tensors if not t.fused_qkv):
                extras[hp + HF_ATTENTION + t.hf] = ranks.variant_tensor(p, mp + MG_ATTENTION + t.megatron, t)
    if strict:
        ranks.check_all_read("Llama")
    ordered = {k: hf[k] for k in hf_expected_shapes(arch)}
    ordered.update(extras)
    return ordered


# --------------------------------------------------------------------------------------------
# Directories and live models.


def load_hf_llama_dir(path: Union[str, Path], expected_arch=None) -> tuple[LlamaArchConfig, dict[str, torch.Tensor]]:
    """(architecture, state dict) of a Hugging Face Llama directory: config.json + *.safetensors only,
    everything validated before returning."""
    return load_hf_dir(path, "llama", expected_arch)


def load_hf_llama_into_model(
    model: torch.nn.Module,
    hf: Union[str, Path, Mapping[str, torch.Tensor]],
    arch: Union[LlamaArchConfig, str],
    **options,
) -> None:
    """Load a Hugging Face Llama (directory or state dict) into this rank's ``build_llama_model`` model:
    ``hf_opt.load_hf_into_model`` (``options``: allow_missing; the variant's own tensors keep their
    initialisation)."""
    load_hf_into_model(model, hf, load_arch_config(arch), **options)


__all__ = [
    "HF_CONFIG_KEYS",
    "HF_LAYER_PREFIX",
    "STRUCTURAL_FIELDS",
    "VOCAB_PARALLEL",
    "arch_from_hf_config",
    "llama_variant_tensors",
    "check_same_architecture",
    "fuse_qkv",
    "gather_megatron_state_dicts",
    "hf_config_dict",
    "hf_expected_shapes",
    "hf_state_dict_to_megatron",
    "load_hf_llama_dir",
    "load_hf_llama_into_model",
    "load_megatron_state_dict",
    "megatron_to_hf_state_dict",
    "read_hf_safetensors",
    "split_variant_state",
    "unfuse_qkv",
    "validate_hf_state_dict",
    "variant_hf_shapes",
    "variant_tensors_of",
]
