"""Per-head attention gate (gated attention, Bondarenko et al. 2023): its math, for every module that
holds a gate (megatron's ``OutEffHeadGate``, the Hugging Face remote code). Knows nothing of Megatron;
imports torch and its sibling ``variants`` only, so the Hugging Face export ships both verbatim.

Per head h, with x the attention layer's input [..., d_model] and x_h head h's d_head-wide slice
x[..., h*d_head:(h+1)*d_head]:

    g_h = sigmoid(G_h(x_h))
    linear         G_h(x_h) = w_h . x_h + b_h                         weight [H, d_head], bias [H]
    mlp            G_h(x_h) = w2_h . relu(W1_h x_h + b1_h) + b2_h     fc1_weight [H, r, d_head], fc1_bias [H, r],
                                                                      fc2_weight [H, r], fc2_bias [H]; r = d_head // 4
    shared_linear  G(x) = W x + b over all of x                       weight [H, d_model], bias [H]

and head h's attention output (after P V) is multiplied by g_h before the output projection.
The parameters (names, shapes, initial values, megatron / Hugging Face names) are described with every
other tensor a variant adds in ``variants.variant_tensors``.
"""
from __future__ import annotations

from typing import Mapping, Tuple

import torch

from .variants import GATE_VARIANTS, AttentionVariantConfig, check_choice, variant_tensors

GATE_KINDS = tuple(g for g in GATE_VARIANTS if g != "none")  # the gates with parameters


def gate_parameter_names(kind: str) -> Tuple[str, ...]:
    """The names of a ``kind`` gate's parameters in ``head_gate`` (``variants.variant_tensors``' ``name``)."""
    check_choice("gate", kind, GATE_KINDS)
    return tuple(t.name for t in variant_tensors(AttentionVariantConfig(gate=kind), num_heads=1, head_dim=4, hidden_size=4))


def head_gate(x: torch.Tensor, kind: str, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Gate values g [..., H] in (0, 1), fp32 (fp64 for fp64 x), of the input x [..., width].

    params: the gate's tensors by ``gate_parameter_names(kind)`` (for H heads: possibly a tensor-parallel
    rank's heads). width: H * d_head (linear, mlp: the heads' slices of the input) or d_model (shared_linear).
    Products run in x's dtype (parameters cast to it), the sigmoid in fp32 (fp64 for fp64).
    Errors: one-line ValueError for an unknown kind or parameter names other than the kind's.
    """
    names = gate_parameter_names(kind)
    if sorted(params) != sorted(names):
        raise ValueError(f"gate={kind!r} parameters {sorted(params)}: expected {sorted(names)}")
    p = {name: t.to(x.dtype) for name, t in params.items()}
    if kind == "shared_linear":
        logits = torch.nn.functional.linear(x, p["weight"], p["bias"])
    elif kind == "linear":
        xh = x.reshape(*x.shape[:-1], p["weight"].shape[0], -1)                           # [..., H, d]
        logits = torch.einsum("...hd,hd->...h", xh, p["weight"]) + p["bias"]
    else:  # mlp
        xh = x.reshape(*x.shape[:-1], p["fc1_weight"].shape[0], -1)
        hidden = torch.relu(torch.einsum("...hd,hrd->...hr", xh, p["fc1_weight"]) + p["fc1_bias"])
        logits = torch.einsum("...hr,hr->...h", hidden, p["fc2_weight"]) + p["fc2_bias"]
    return torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))


__all__ = ["GATE_KINDS", "gate_parameter_names", "head_gate"]
