"""The OPT family (Zhang et al. 2022) as megatron-core GPTModels.

OPT in megatron-core terms: pre-LayerNorm decoder, ReLU FFN of width 4h (no GLU), biases on every
linear (QKV included), learned absolute positions, a final LayerNorm, and the LM head tied to the
token embedding. OPT-350m differs: post-LayerNorm layers (no final LayerNorm) and a 512-wide token
embedding projected to the 1024-wide model (``project_in`` / ``project_out``); both are built from
megatron's own layer through specs and thin subclasses in :mod:`megatron_outeff.models.opt_layers`.
Architectures live in ``configs/model/opt-<size>.yaml`` and load into :class:`OPTArchConfig`;
:func:`build_opt_model` turns one into a GPTModel for the tensor/pipeline layout that megatron's
``parallel_state`` was initialised with (by the caller).

Position offset (Hugging Face / metaseq OPT reads row ``pos + 2`` of a table of ``max_positions + 2``
rows): the megatron model keeps the SAME ``max_positions + 2``-row table as one ordinary parameter
(``embedding.position_embeddings.weight``) and adds the offset inside the embedding lookup
(:class:`OPTPositionEmbedding`). Why this representation:
  * the Hugging Face round trip is lossless by construction: the two offset rows travel as part
    of the one tensor, nothing is split off, re-created or guessed on export;
  * training code keeps megatron-native 0-based ``position_ids`` (0 .. seq-1), exactly what
    megatron's data pipeline produces, so no caller has to know about OPT's quirk;
  * a parameter (not a side buffer) goes through megatron's state_dict / dist_checkpointing /
    DDP / optimizer paths unchanged. The two offset rows get zero gradient (never read for
    position ids >= 0); with decoupled weight decay they shrink slightly during training, which
    is harmless: Hugging Face reads them only for left-padding positions (-1 -> row 1), whose
    outputs are masked anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Union

import torch
import torch.nn.functional as F

from megatron_outeff.errors import OutEffError

from . import common, model_yaml

# Hugging Face OPTLearnedPositionalEmbedding.offset (inherited from fairseq's padding_idx + 1).
OPT_POSITION_OFFSET = 2

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


@dataclass
class OPTArchConfig(common.ArchConfigBase):
    """One OPT architecture: the ``arch:`` section of ``configs/model/opt-<size>.yaml``."""

    family: ClassVar[str] = "opt"  # models/family.py
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    vocab_size: int = 50272
    max_position_embeddings: int = 2048
    # Width of the token embedding (and the tied LM head); None means hidden_size. Only OPT-350m
    # differs (512, with project_in / project_out linears around the decoder; models/opt_layers.py).
    word_embed_proj_dim: Optional[int] = None
    # False only for OPT-350m (post-LayerNorm, no final LayerNorm).
    do_layer_norm_before: bool = True
    layernorm_epsilon: float = 1e-5
    activation: str = "relu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.0
    init_method_std: float = 0.006
    # OPT paper sec. 2.2 (following Megatron-LM): output layers (attention out_proj, fc2) use
    # std / sqrt(2 * num_layers). False: every linear uses init_method_std (Hugging Face's init).
    scaled_output_layer_init: bool = True

    def __post_init__(self):
        common.check_arch_sizes(self)
        if self.activation not in _ACTIVATIONS:
            raise OutEffError(f"{self.name}: activation={self.activation!r}: expected one of {sorted(_ACTIVATIONS)}")
        common.check_arch_values(
            self, positive_ints=(), probabilities=("hidden_dropout", "attention_dropout"), positive=("init_method_std",)
        )
        if self.word_embed_proj_dim is not None and (
            not isinstance(self.word_embed_proj_dim, int)
            or isinstance(self.word_embed_proj_dim, bool)
            or self.word_embed_proj_dim < 1
        ):
            raise OutEffError(
                f"{self.name}: word_embed_proj_dim={self.word_embed_proj_dim!r}: expected a positive integer or null"
            )
        if not isinstance(self.do_layer_norm_before, bool):
            raise OutEffError(
                f"{self.name}: do_layer_norm_before={self.do_layer_norm_before!r}: expected true or false"
            )
        if not float(self.layernorm_epsilon) > 0:
            raise OutEffError(f"{self.name}: layernorm_epsilon={self.layernorm_epsilon!r}: expected > 0")

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim if self.word_embed_proj_dim is not None else self.hidden_size


padded_vocab_size = common.padded_vocab_size  # where OPT-only releases documented it (owner: models.common)


def load_arch_config(name_or_path: Union[str, Path, OPTArchConfig]) -> OPTArchConfig:
    """The architecture of an OPT size name ('125m', 'opt-1.3b', 'tiny') or of a YAML file path."""
    return model_yaml.load_arch(OPTArchConfig, name_or_path)


def load_parallel_hint(name_or_path: Union[str, Path]) -> model_yaml.ParallelHint:
    """The suggested layout (tensor_parallel, pipeline_parallel, zero_stage) of a model YAML, checked
    against its architecture; defaults when it has no such section."""
    return model_yaml.load_parallel_hint(OPTArchConfig, name_or_path, check_parallel_layout)


def available_sizes() -> list[str]:
    return model_yaml.shipped_sizes(OPTArchConfig.family)


# --------------------------------------------------------------------------------------------
# Parallel layout (the vocabulary's padding: models/common.py padded_vocab_size).


def check_parallel_layout(arch: OPTArchConfig, tp_size: int, pp_size: int) -> None:
    """One-line OutEffError unless TP divides the heads and the FFN, and PP the layers."""
    tp_split = (("num_attention_heads", arch.num_attention_heads), ("ffn_hidden_size", arch.ffn_hidden_size))
    common.check_layout_divides(arch, tp_size, pp_size, tp_split)


# --------------------------------------------------------------------------------------------
# TransformerConfig and model.


# The TransformerConfig fields opt_transformer_config sets from the architecture: megatron's name -> the
# OPTArchConfig field that sets it, or None where the OPT family fixes the value (or derives it).
TRANSFORMER_FIELDS_FROM_ARCH = {**common.COMMON_TRANSFORMER_FIELDS, "activation_func": "activation"}


# TransformerConfig fields the OPT family does not support through overrides, with the reason: each would change
# the parameter set (in a way OPT's converter and Hugging Face export cannot represent), or it selects a layer
# structure the OPT layer spec does not build (megatron would ignore it silently). The training config refuses them.
_NOT_BUILT = (
    "selects a layer structure the OPT family's layer spec does not build, so megatron would silently ignore it"
)
TRANSFORMER_FIELDS_UNSUPPORTED = {
    "num_query_groups": "grouped-query attention changes linear_qkv's shape; OPT is multi-head attention (one "
    "key/value head per query head), which its converter and Hugging Face export assume: not "
    "supported for the OPT family",
    "num_moe_experts": _NOT_BUILT,
    "moe_layer_freq": _NOT_BUILT,
    "multi_latent_attention": _NOT_BUILT,
    "experimental_attention_variant": _NOT_BUILT,
    "qk_layernorm": _NOT_BUILT,
    "mtp_num_layers": _NOT_BUILT,
    "heterogeneous_block_specs": _NOT_BUILT,
}


def opt_transformer_config(arch: Union[OPTArchConfig, str], variant=None, **overrides):
    """megatron-core TransformerConfig for an OPT architecture (and an attention variant).

    The attention variant travels in the layer spec's params (megatron_outeff.megatron.layer_spec) and
    megatron's own ``softmax_type`` stays 'vanilla'; the config carries only what megatron sizes its
    parameters by (``megatron.variant.transformer_config_fields``: ``attention_output_gate`` for the
    elementwise gate's rows in linear_qkv).
    TP/PP sizes come from megatron's parallel_state (1/1 if it is not initialised). Every fusion
    flag is off: the fused kernels are CUDA-only (and bias-activation fusion has no ReLU kernel);
    callers on GPU may switch them on through ``overrides``.
    """
    arch = load_arch_config(arch)
    # the architecture's fields (TRANSFORMER_FIELDS_FROM_ARCH), then what OPT fixes (the layout, dtype and
    # fusion flags: models/common.py)
    fixed = dict(
        kv_channels=arch.head_dim,
        activation_func=_ACTIVATIONS[arch.activation],
        # OPT: a plain (non-GLU) FFN, biases on every linear, LayerNorm, the residual taken before the norm
        gated_linear_unit=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        normalization="LayerNorm",
        apply_residual_connection_post_layernorm=False,
    )
    return common.family_transformer_config(arch, TRANSFORMER_FIELDS_FROM_ARCH, fixed, overrides, variant)


class OPTLayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm with megatron's norm constructor signature and sequence-parallel support.

    megatron's WrappedTorchNorm refuses sequence parallelism (apex/TE norms carry the flag, neither
    exists on CPU). Under SP each TP rank normalises its own sequence slice, so the LayerNorm
    gradients are partial sums: the ``sequence_parallel`` attribute makes megatron's
    finalize_model_grads all-reduce them over the TP group. (Same as layer_spec.TorchNorm; kept
    here so the vanilla path does not import the variant machinery.)
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = bool(config.sequence_parallel)


def opt_block_spec(config, variant=None, *, seq_length: Optional[int] = None, post_layernorm: bool = False):
    """This pipeline stage's TransformerBlock spec (layers + final LayerNorm).

    post_layernorm: OPT-350m's post-LN layers (``opt_layers.post_layernorm_layer_spec``), no final norm.

    variant None: megatron's local (non-TE) layer, i.e. megatron's own DotProductAttention.
    Otherwise: megatron_outeff's outlier-efficient layer (``get_outeff_block_spec``), even for a
    vanilla AttentionVariantConfig, so every variant of an experiment runs the same attention code.
    Norms are SP-capable torch LayerNorms where megatron would pick WrappedTorchNorm (no apex).
    """
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules

    variant = common.as_variant(variant)
    if variant is not None:
        from megatron_outeff.megatron.layer_spec import get_outeff_block_spec

        sub = get_outeff_block_spec(config, variant, seq_length=seq_length)
    else:
        sub = common.local_block_submodules(config, OPTLayerNorm, replace=(torch.nn.LayerNorm,))
    if not post_layernorm:
        return ModuleSpec(module=TransformerBlock, submodules=sub)
    from .opt_layers import post_layernorm_layer_spec

    # Post-LN: the layer's norms move behind the residual adds; no final LayerNorm.
    layers = [post_layernorm_layer_spec(s) for s in sub.layer_specs]
    return ModuleSpec(
        module=TransformerBlock, submodules=TransformerBlockSubmodules(layer_specs=layers, layer_norm=None)
    )


class OPTPositionEmbedding(torch.nn.Embedding):
    """Learned absolute positions with OPT's offset: 0-based position ids read row ``pos + 2`` of a
    ``max_positions + 2``-row table (see the module docstring for why)."""

    offset = OPT_POSITION_OFFSET

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(position_ids + self.offset)


def _gpt_model_class():
    from megatron.core.models.gpt import GPTModel

    class OPTGPTModel(GPTModel):
        """GPTModel whose position table has OPT's two extra leading rows (0-based position ids in)."""

        def __init__(
            self,
            config,
            transformer_layer_spec,
            vocab_size: int,
            max_positions: int,
            embedding_dim: Optional[int] = None,
            **kwargs,
        ):
            # Read by setup_embeddings_and_output_layer, which GPTModel.__init__ calls.
            object.__setattr__(self, "_opt_embedding_dim", embedding_dim or config.hidden_size)
            super().__init__(
                config=config,
                transformer_layer_spec=transformer_layer_spec,
                vocab_size=vocab_size,
                max_sequence_length=max_positions + OPT_POSITION_OFFSET,
                position_embedding_type="learned_absolute",
                **kwargs,
            )
            # Report the usable sequence length, not the table size.
            self.max_sequence_length = self.max_position_embeddings = max_positions
            if self.pre_process:
                emb = self.embedding.position_embeddings
                # Re-class in place: the parameter, its megatron init and attributes stay untouched;
                # only the lookup gains the offset.
                emb.__class__ = OPTPositionEmbedding
                self.embedding.max_sequence_length = max_positions

        def setup_embeddings_and_output_layer(self) -> None:
            # OPT-350m: GPTModel built the embedding and LM head hidden_size wide; swap in the
            # embedding_dim-wide ones with project_in / project_out (opt_layers) before megatron ties
            # and synchronises them. Same arguments as GPTModel's own construction otherwise.
            if self._opt_embedding_dim != self.config.hidden_size:
                from .opt_layers import OPTProjectedOutputLayer, OPTProjectedWordEmbedding

                E, h, cfg = self._opt_embedding_dim, self.config.hidden_size, self.config
                if self.pre_process:
                    self.embedding.word_embeddings = OPTProjectedWordEmbedding(
                        self.vocab_size,
                        E,
                        h,
                        init_method=cfg.embedding_init_method,
                        config=cfg,
                        reduce_scatter_embeddings=self.embedding.reduce_scatter_embeddings,
                        tp_group=self.embedding.tp_group,
                    )
                if self.post_process:
                    self.output_layer = OPTProjectedOutputLayer(
                        h,
                        E,
                        self.vocab_size,
                        config=cfg,
                        init_method=cfg.init_method,
                        bias=False,
                        skip_bias_add=False,
                        gather_output=not self.parallel_output,
                        skip_weight_param_allocation=self.pre_process and self.share_embeddings_and_output_weights,
                        embedding_activation_buffer=self.embedding_activation_buffer,
                        grad_output_buffer=self.grad_output_buffer,
                        tp_group=self.pg_collection.tp,
                    )
            super().setup_embeddings_and_output_layer()

    # Importable (and picklable) as megatron_outeff.models.opt.OPTGPTModel.
    OPTGPTModel.__module__ = __name__
    OPTGPTModel.__qualname__ = "OPTGPTModel"
    return OPTGPTModel


_OPT_GPT_MODEL = None


def opt_gpt_model_class():
    """The OPTGPTModel class, created on first use so importing this module does not import megatron."""
    global _OPT_GPT_MODEL
    if _OPT_GPT_MODEL is None:
        _OPT_GPT_MODEL = _gpt_model_class()
    return _OPT_GPT_MODEL


def __getattr__(name):
    if name == "OPTGPTModel":
        return opt_gpt_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_opt_model(arch: Union[OPTArchConfig, str], variant=None, **options):
    """An OPT megatron-core GPTModel for this rank's (TP, PP) position in megatron's parallel_state.

    ``options`` (keyword-only) as ``models.common.build_family_model``: vocab_size, params_dtype,
    sequence_parallel, pre_process, post_process, seq_length, and TransformerConfig overrides.
    Forward takes megatron-native 0-based ``position_ids``; the OPT offset is applied inside.
    """
    return common.build_family_model(load_arch_config(arch), variant, **options)


def block_spec(config, arch: OPTArchConfig, variant, seq_length: Optional[int]):
    """build_family_model's hook: a block spec (rather than a layer spec) so the final LayerNorm is SP-capable
    too; OPT-350m's post-LN layers."""
    return opt_block_spec(config, variant, seq_length=seq_length, post_layernorm=not arch.do_layer_norm_before)


def construct_model(config, spec, arch: OPTArchConfig, **kwargs):
    """build_family_model's hook: the OPTGPTModel (tied LM head, learned positions with OPT's offset)."""
    return opt_gpt_model_class()(
        config,
        spec,
        max_positions=arch.max_position_embeddings,
        embedding_dim=arch.embed_dim,
        share_embeddings_and_output_weights=True,
        parallel_output=True,
        **kwargs,
    )


# The family interface (models/family.py): the names every family's arch module offers.
ArchConfig = OPTArchConfig
transformer_config = opt_transformer_config
build_model = build_opt_model
