"""megatron-core building blocks for the OPT variants that differ from megatron's GPT (OPT-350m).

Imports megatron at import time; ``models.opt`` imports this module only when an architecture needs it.

Post-LayerNorm (``do_layer_norm_before=False``; Hugging Face ``OPTDecoderLayer``):
    h = LN_attn(x + Attn(x));  out = LN_mlp(h + MLP(h))
megatron-core 0.16's ``TransformerLayer`` only places norms before its sublayers. ``OPTPostLNTransformerLayer``
is a thin subclass that applies two extra norms from its spec (``OPTPostLNLayerSubmodules``:
``post_self_attn_layernorm``, ``post_mlp_layernorm``) to the outputs of megatron's own
``_forward_attention`` (after the residual add) and ``_forward_post_mlp`` (after the residual add);
the input / pre-MLP norms are ``IdentityOp``. :func:`post_layernorm_layer_spec` turns any pre-LN
TransformerLayer spec (megatron's local spec, megatron_outeff's outlier-efficient spec) into this
form, moving its norms (same norm class) to the post positions. Post-LN OPT has no final LayerNorm.
(OPT has no cross-attention; megatron's cross-attention slot runs inside ``_forward_attention``
and stays an identity.)

Embedding projection (``word_embed_proj_dim`` E != hidden_size h; Hugging Face
``project_in`` [h, E] and ``project_out`` [E, h], Linear without bias):
    tokens -> word embedding [V, E] (vocab-parallel) -> project_in -> + positions [h] -> decoder
    decoder -> (final LN, pre-LN only) -> project_out -> tied LM head [V, E] (column parallel)
Both projections are plain ``torch.nn.Linear`` modules REPLICATED on every tensor-parallel rank
(not column/row parallel): they are E*h weights (0.5 M for OPT-350m), smaller than one layer's
attention projection, and applying them to the full hidden vector on every rank needs no
communication, so the TP layout of everything else is unchanged. Their gradients are identical on
every TP rank without sequence parallelism; under SP ``project_out`` sees this rank's sequence slice,
so its weight carries ``sequence_parallel=True`` (megatron all-reduces such grads over TP, as for
LayerNorms). ``project_in`` always sees the full sequence (with learned positions megatron scatters
to SP only after adding them).
State-dict names: ``embedding.word_embeddings.project_in.weight`` (first pipeline stage) and
``output_layer.project_out.weight`` (last stage).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, VocabParallelEmbedding
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules


@dataclass
class OPTPostLNLayerSubmodules(TransformerLayerSubmodules):
    """TransformerLayerSubmodules plus the two norms applied after the residual adds."""

    post_self_attn_layernorm: Union[ModuleSpec, type] = IdentityOp
    post_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp


class OPTPostLNTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer with LayerNorms after the residual adds (OPT-350m's post-LN)."""

    def __init__(self, config, submodules: OPTPostLNLayerSubmodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        norm = dict(config=self.config, hidden_size=self.config.hidden_size, eps=self.config.layernorm_epsilon)
        self.post_self_attn_layernorm = build_module(submodules.post_self_attn_layernorm, **norm)
        self.post_mlp_layernorm = build_module(submodules.post_mlp_layernorm, **norm)

    def _forward_attention(self, *args, **kwargs):
        hidden_states, context = super()._forward_attention(*args, **kwargs)
        return self.post_self_attn_layernorm(hidden_states), context

    def _forward_post_mlp(self, mlp_output_with_bias, residual):
        return self.post_mlp_layernorm(super()._forward_post_mlp(mlp_output_with_bias, residual))


def post_layernorm_layer_spec(layer_spec: ModuleSpec) -> ModuleSpec:
    """A copy of a pre-LN TransformerLayer spec as a post-LN ``OPTPostLNTransformerLayer`` spec:
    ``input_layernorm`` -> ``post_self_attn_layernorm``, ``pre_mlp_layernorm`` -> ``post_mlp_layernorm``."""
    s = layer_spec.submodules
    if not issubclass(layer_spec.module, TransformerLayer) or s.input_layernorm is IdentityOp:
        raise ValueError(f"post_layernorm_layer_spec: expected a pre-LN TransformerLayer spec, got {layer_spec.module}")
    fields = {f.name: getattr(s, f.name) for f in dataclasses.fields(TransformerLayerSubmodules)}
    fields.update(
        input_layernorm=IdentityOp,
        pre_mlp_layernorm=IdentityOp,
        post_self_attn_layernorm=s.input_layernorm,
        post_mlp_layernorm=s.pre_mlp_layernorm,
    )
    return ModuleSpec(
        module=OPTPostLNTransformerLayer,
        params=dict(layer_spec.params or {}),
        submodules=OPTPostLNLayerSubmodules(**fields),
    )


def _replicated_linear(
    in_features: int, out_features: int, config, init_method, sequence_parallel: bool
) -> torch.nn.Linear:
    lin = torch.nn.Linear(in_features, out_features, bias=False, dtype=config.params_dtype)
    if config.perform_initialization:
        init_method(lin.weight)
    lin.weight.sequence_parallel = bool(sequence_parallel)
    return lin


class OPTProjectedWordEmbedding(VocabParallelEmbedding):
    """Vocab-parallel token embedding of width E followed by the replicated ``project_in`` (E -> h)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, hidden_size: int, *, init_method, config, **kwargs):
        super().__init__(num_embeddings, embedding_dim, init_method=init_method, config=config, **kwargs)
        if self.reduce_scatter_embeddings:
            raise ValueError(
                "OPTProjectedWordEmbedding: reduce_scatter_embeddings is not supported (learned positions never use it)"
            )
        self.project_in = _replicated_linear(embedding_dim, hidden_size, config, init_method, sequence_parallel=False)

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        """[b, s] token ids -> [b, s, h]."""
        return self.project_in(super().forward(input_))


class OPTProjectedOutputLayer(ColumnParallelLinear):
    """The replicated ``project_out`` (h -> E) followed by the column-parallel (tied) LM head [V/tp, E]."""

    def __init__(self, hidden_size: int, embedding_dim: int, vocab_size: int, *, config, init_method, **kwargs):
        super().__init__(embedding_dim, vocab_size, config=config, init_method=init_method, **kwargs)
        self.project_out = _replicated_linear(
            hidden_size, embedding_dim, config, config.init_method, sequence_parallel=config.sequence_parallel
        )

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        """[s, b, h] -> ([s, b, V/tp] or gathered [s, b, V], None)."""
        return super().forward(self.project_out(input_), weight=weight, runtime_gather_output=runtime_gather_output)
