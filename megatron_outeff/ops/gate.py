"""Per-head attention gate (gated attention, Bondarenko et al. 2023): its parameters, their initial
values and its math, for every module that holds a gate (megatron's ``OutEffHeadGate``, the Hugging
Face remote code). Knows nothing of Megatron; imports torch and its sibling ``variants`` only, so the
Hugging Face export ships both verbatim.

Per head h, with x the attention layer's input [..., d_model] and x_h head h's d_head-wide slice
x[..., h*d_head:(h+1)*d_head]:

    g_h = sigmoid(G_h(x_h))
    linear         G_h(x_h) = w_h . x_h + b_h                         weight [H, d_head], bias [H]
    mlp            G_h(x_h) = w2_h . relu(W1_h x_h + b1_h) + b2_h     fc1_weight [H, r, d_head], fc1_bias [H, r],
                                                                      fc2_weight [H, r], fc2_bias [H]; r = d_head // 4
    shared_linear  G(x) = W x + b over all of x                       weight [H, d_model], bias [H]

and head h's attention output (after P V) is multiplied by g_h before the output projection.
Initial values: weights by the caller's weight init (N(0, std)); fc1_bias 0; the output bias
(bias / fc2_bias) logit(gate_init_prob), so every gate opens to gate_init_prob.
Parameter names are those of the Hugging Face checkpoints; megatron checkpoints name the mlp gate's
fc2_bias "bias" (``megatron_outeff.megatron.self_attention``).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple

import torch

from .variants import GATE_VARIANTS, check_choice

GATE_KINDS = tuple(g for g in GATE_VARIANTS if g != "none")  # the gates with parameters


def gate_parameter_shapes(kind: str, num_heads: int, head_dim: int, hidden_size: int) -> Dict[str, Tuple[int, ...]]:
    """{parameter name: shape} of a ``kind`` gate over ``num_heads`` heads, in creation order.

    Errors (one-line ValueError): an unknown kind; linear/mlp when hidden_size != num_heads * head_dim
    (they read head h's slice of the input); mlp with head_dim < 4 (hidden width head_dim // 4 = 0).
    """
    H, d = num_heads, head_dim
    check_choice("gate", kind, GATE_KINDS)
    if kind == "shared_linear":
        return {"weight": (H, hidden_size), "bias": (H,)}
    if d * H != hidden_size:
        raise ValueError(
            f"gate={kind!r} reads head h's d_head-wide slice of the input, which needs hidden_size "
            f"({hidden_size}) == num_attention_heads * head_dim ({H} * {d}); use gate='shared_linear'"
        )
    if kind == "linear":
        return {"weight": (H, d), "bias": (H,)}
    if d < 4:
        raise ValueError(f"gate='mlp' with head_dim={d}: the hidden width head_dim // 4 would be 0 (needs head_dim >= 4)")
    r = d // 4
    return {"fc1_weight": (H, r, d), "fc1_bias": (H, r), "fc2_weight": (H, r), "fc2_bias": (H,)}


def gate_initial_value(name: str, gate_init_prob: float) -> Optional[float]:
    """The constant a freshly initialised gate parameter holds, or None for a weight (the caller's
    weight init). The output bias is logit(gate_init_prob): sigmoid(bias) = gate_init_prob."""
    if name in ("bias", "fc2_bias"):
        return math.log(gate_init_prob / (1.0 - gate_init_prob))
    if name == "fc1_bias":
        return 0.0
    return None


def head_gate(x: torch.Tensor, kind: str, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Gate values g [..., H] in (0, 1), fp32 (fp64 for fp64 x), of the input x [..., width].

    params: ``gate_parameter_shapes``' tensors (for H heads: possibly a tensor-parallel rank's heads).
    width: H * d_head (linear, mlp: the heads' slices of the input) or d_model (shared_linear).
    Products run in x's dtype (parameters cast to it), the sigmoid in fp32 (fp64 for fp64).
    """
    check_choice("gate", kind, GATE_KINDS)
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


__all__ = ["GATE_KINDS", "gate_initial_value", "gate_parameter_shapes", "head_gate"]
