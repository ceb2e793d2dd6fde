"""The Llama family (Touvron et al. 2023; Llama 2, Llama 3) as megatron-core GPTModels.

Llama in megatron-core terms: pre-RMSNorm decoder, rotary position embeddings (RoPE, Su et al. 2021)
on queries and keys, SwiGLU FFN (``gated_linear_unit`` with SiLU: down(silu(gate x) * up x)),
grouped-query attention (``num_query_groups`` key/value heads shared by ``num_attention_heads /
num_query_groups`` query heads each; Ainslie et al. 2023), no linear biases, a final RMSNorm, and an
output layer (LM head) untied from the token embedding. Everything is megatron's own GPTModel,
built through the same layer spec as OPT (``megatron_outeff.megatron.layer_spec``): our core
attention runs every attention variant and gate; the norms are SP-capable torch RMSNorms.

RoPE convention: Hugging Face's Llama (``rotate_half``) rotates the pair (x_i, x_{i + d/2}) of each
head ("half-split"), which is megatron's ``rotary_interleaved=False``; Meta's original checkpoints
rotate (x_{2i}, x_{2i+1}) ("interleaved") and transformers' conversion script permutes the q / k rows
to half-split. Hugging Face weights therefore map to megatron without any permutation, with
``rotary_interleaved=False`` (fixed here; tests/models/test_llama_parity.py fails if it is flipped).
Frequencies: theta_j = rope_theta^(-2j / d); Llama 3.1's "llama3" scaling is megatron's
``rope_scaling`` (its low_freq_factor 1, high_freq_factor 4 and original context 8192 are fixed in
megatron-core 0.16; ``rope_scaling_factor`` sets the factor).

Architectures live in ``configs/model/llama-<size>.yaml`` (``family: llama``) and load into
:class:`LlamaArchConfig`; :func:`build_llama_model` builds this rank's TP shard / PP stage from
megatron's ``parallel_state``. The family interface (``models/family.py``) is at the end of the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Union

import torch.nn.functional as F

from megatron_outeff.errors import OutEffError

from . import common, model_yaml

FAMILY = "llama"


@dataclass
class LlamaArchConfig(common.ArchConfigBase):
    """One Llama architecture: the ``arch:`` section of ``configs/model/llama-<size>.yaml``.

    Field names follow megatron-core (and OPTArchConfig where the two families share a knob, so the
    same ``model.arch_overrides`` work for both); the Hugging Face LlamaConfig key of each is in
    ``models/hf_llama.py`` HF_CONFIG_KEYS.
    """

    family: ClassVar[str] = FAMILY  # models/family.py
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int  # the SwiGLU width (HF intermediate_size); fc1 holds gate and up: 2x this
    # Key/value heads (HF num_key_value_heads); None: one per query head (multi-head attention).
    num_query_groups: Optional[int] = None
    vocab_size: int = 32000
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # Llama 3.1's "llama3" RoPE scaling factor (None: no scaling); megatron fixes its other parameters.
    rope_scaling_factor: Optional[float] = None
    layernorm_epsilon: float = 1e-5  # the RMSNorm epsilon (HF rms_norm_eps)
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    # megatron's default: output layers (attention linear_proj, fc2) use std / sqrt(2 * num_layers).
    scaled_output_layer_init: bool = True

    def __post_init__(self):
        common.check_arch_sizes(self, ("num_query_groups",) if self.num_query_groups is not None else ())
        common.check_arch_values(
            self,
            positive_ints=(),
            probabilities=("hidden_dropout", "attention_dropout"),
            positive=("init_method_std", "layernorm_epsilon", "rope_theta"),
        )
        if self.num_attention_heads % self.query_groups != 0:
            raise OutEffError(
                f"{self.name}: num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.query_groups}"
            )
        if self.head_dim % 2:
            raise OutEffError(f"{self.name}: head dimension {self.head_dim} is odd; rotary embeddings rotate pairs")
        if self.rope_scaling_factor is not None and not float(self.rope_scaling_factor) > 0:
            raise OutEffError(f"{self.name}: rope_scaling_factor={self.rope_scaling_factor!r}: expected > 0 or null")

    @property
    def query_groups(self) -> int:
        """Key/value heads (num_query_groups, or num_attention_heads when unset)."""
        return self.num_query_groups or self.num_attention_heads

    def num_parameters(self) -> int:
        """Parameters of the Hugging Face model (embedding and LM head untied, no padding rows)."""
        h, f, v, kv = self.hidden_size, self.ffn_hidden_size, self.vocab_size, self.query_groups * self.head_dim
        layer = h * h * 2 + 2 * h * kv + 3 * h * f + 2 * h
        return self.num_layers * layer + 2 * v * h + h


def load_arch_config(name_or_path: Union[str, Path, LlamaArchConfig]) -> LlamaArchConfig:
    """The architecture of a Llama size name ('tiny', 'llama-tiny', 'llama-3-8b') or of a YAML file path."""
    return model_yaml.load_arch(LlamaArchConfig, name_or_path)


def load_parallel_hint(name_or_path: Union[str, Path]):
    """The suggested layout (tensor_parallel, pipeline_parallel, zero_stage) of a Llama model YAML."""
    return model_yaml.load_parallel_hint(LlamaArchConfig, name_or_path, check_parallel_layout)


def available_sizes() -> list[str]:
    return model_yaml.shipped_sizes(FAMILY)


def check_parallel_layout(arch: LlamaArchConfig, tp_size: int, pp_size: int) -> None:
    """One-line OutEffError unless TP divides heads, key/value heads and the FFN, and PP the layers
    (megatron gives each TP rank whole query groups)."""
    tp_split = (
        ("num_attention_heads", arch.num_attention_heads),
        ("num_query_groups", arch.query_groups),
        ("ffn_hidden_size", arch.ffn_hidden_size),
    )
    common.check_layout_divides(arch, tp_size, pp_size, tp_split)


# The TransformerConfig fields llama_transformer_config sets from the architecture: megatron's name ->
# the LlamaArchConfig field that sets it, or None where the Llama family fixes (or derives) the value.
TRANSFORMER_FIELDS_FROM_ARCH = {
    **common.COMMON_TRANSFORMER_FIELDS,
    "num_query_groups": "num_query_groups",
    "activation_func": None,
    "rotary_interleaved": None,
}


# TransformerConfig fields the Llama family does not support through overrides (the training config refuses
# them with the reason; models/opt.py has OPT's): layer structures the Llama layer spec does not build, and
# knobs that change what its layers compute away from Hugging Face's Llama (found by the scan in
# tests/training/test_config.py, which sets every YAML-settable field on a tiny Llama too).
# num_query_groups is the architecture's (TRANSFORMER_FIELDS_FROM_ARCH: model.arch_overrides.num_query_groups).
_NOT_HF_LLAMA = (
    "changes the function Llama's layers compute ({what}), which the checkpoint's manifest and the "
    "Hugging Face Llama export do not represent: not supported for the Llama family"
)
TRANSFORMER_FIELDS_UNSUPPORTED = {
    **{
        key: "selects a layer structure the Llama family's layer spec does not build, so megatron would silently "
        "ignore it"
        for key in (
            "num_moe_experts",
            "moe_layer_freq",
            "multi_latent_attention",
            "experimental_attention_variant",
            "qk_layernorm",
            "mtp_num_layers",
            "heterogeneous_block_specs",
        )
    },
    "glu_linear_offset": _NOT_HF_LLAMA.format(what="SwiGLU's up projection shifted by an offset"),
    "activation_func_clamp_value": _NOT_HF_LLAMA.format(what="SwiGLU's inputs clamped"),
    "no_rope_freq": _NOT_HF_LLAMA.format(what="rotary embeddings skipped in some layers"),
}


def llama_transformer_config(arch: Union[LlamaArchConfig, str], variant=None, **overrides):
    """megatron-core TransformerConfig for a Llama architecture.

    As ``opt_transformer_config``: the attention variant travels in the layer spec (``variant`` sets only
    what megatron sizes its parameters by: ``attention_output_gate`` for the elementwise gate), TP/PP sizes come from megatron's parallel_state (1/1 if not initialised), every
    CUDA-only fusion is off (callers on GPU may switch them on through ``overrides``).
    """
    arch = load_arch_config(arch)
    fixed = dict(
        num_query_groups=arch.query_groups,
        kv_channels=arch.head_dim,
        # Llama: SwiGLU FFN without biases, RMSNorm, pre-norm residuals, half-split RoPE (module doc)
        activation_func=F.silu,
        gated_linear_unit=True,
        add_bias_linear=False,
        add_qkv_bias=False,
        normalization="RMSNorm",
        apply_residual_connection_post_layernorm=False,
        rotary_interleaved=False,
    )
    return common.family_transformer_config(arch, TRANSFORMER_FIELDS_FROM_ARCH, fixed, overrides, variant)


def llama_block_spec(config, variant=None, *, seq_length: Optional[int] = None):
    """This pipeline stage's TransformerBlock spec: variant None -> megatron's local layer (its own
    DotProductAttention), otherwise our outlier-efficient layer (``get_outeff_block_spec``); the norms
    SP-capable torch RMSNorms (``layer_spec.TorchNorm``) either way."""
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_outeff.megatron.layer_spec import TorchNorm, get_outeff_block_spec

    variant = common.as_variant(variant)
    if variant is not None:
        return ModuleSpec(
            module=TransformerBlock, submodules=get_outeff_block_spec(config, variant, seq_length=seq_length)
        )
    sub = common.local_block_submodules(config, TorchNorm, normalization=config.normalization)
    return ModuleSpec(module=TransformerBlock, submodules=sub)


def build_llama_model(arch: Union[LlamaArchConfig, str], variant=None, **options):
    """A Llama megatron-core GPTModel for this rank's (TP, PP) position in megatron's parallel_state.

    ``options`` (keyword-only) as ``build_opt_model`` (``models.common.build_family_model``): vocab_size,
    params_dtype, sequence_parallel, pre_process, post_process, seq_length, and TransformerConfig overrides.
    Forward takes 0-based ``position_ids`` (megatron's RoPE ignores them: positions are 0..s-1 of the sequence).
    """
    return common.build_family_model(load_arch_config(arch), variant, **options)


def block_spec(config, arch: LlamaArchConfig, variant, seq_length: Optional[int]):
    """build_family_model's hook: ``llama_block_spec``."""
    return llama_block_spec(config, variant, seq_length=seq_length)


def construct_model(config, spec, arch: LlamaArchConfig, **kwargs):
    """build_family_model's hook: megatron's GPTModel with RoPE and an untied LM head."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config,
        spec,
        max_sequence_length=arch.max_position_embeddings,
        share_embeddings_and_output_weights=False,
        parallel_output=True,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        **kwargs,
    )


# The family interface (models/family.py): the names every family's arch module offers.
ArchConfig = LlamaArchConfig
transformer_config = llama_transformer_config
build_model = build_llama_model

__all__ = [
    "ArchConfig",
    "LlamaArchConfig",
    "TRANSFORMER_FIELDS_FROM_ARCH",
    "TRANSFORMER_FIELDS_UNSUPPORTED",
    "available_sizes",
    "build_llama_model",
    "build_model",
    "check_parallel_layout",
    "llama_block_spec",
    "llama_transformer_config",
    "load_arch_config",
    "load_parallel_hint",
    "transformer_config",
]
