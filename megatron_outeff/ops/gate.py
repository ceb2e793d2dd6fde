"""Attention output gates: their math, for every module that holds a gate (megatron's ``OutEffHeadGate``
and ``OutEffSelfAttention``, the Hugging Face remote code, ``outeff_attention``). Knows nothing of Megatron;
imports torch and its sibling ``variants`` only, so the Hugging Face export ships both verbatim. The
parameters (names, shapes, initial values, megatron / Hugging Face names) are described with every other
tensor a variant adds in ``variants.variant_tensors``.

Two families, both multiplying the attention output o (after P V, before the output projection) by a
gate in (0, 1) computed from x, the attention layer's input (the normalised hidden state):

1. Per head (Bondarenko et al. 2023, "Quantizable Transformers: Removing Outliers by Helping Attention
   Heads Do Nothing"; ``head_gate``): one value per head and token, o_h *= g_h. With x_h head h's
   d_head-wide slice x[..., h*d_head:(h+1)*d_head]:

    linear         g_h = sigmoid(w_h . x_h + b_h)                       weight [H, d_head], bias [H]
    mlp            g_h = sigmoid(w2_h . relu(W1_h x_h + b1_h) + b2_h)   fc1_weight [H, r, d_head], fc1_bias [H, r],
                                                                        fc2_weight [H, r], fc2_bias [H]; r = d_head // 4
    shared_linear  g = sigmoid(W x + b) over all of x                   weight [H, d_model], bias [H]

2. Per head and channel (``elementwise``: Qiu et al. 2025, "Gated Attention for Large Language Models:
   Non-linearity, Sparsity, and Attention-Sink-Free", arXiv 2505.06708, their G1 position; megatron-core's
   ``attention_output_gate``; the gate of Qwen3-Next): g = sigmoid(x W^T + b), W [H*d_head, d_model],
   o[h, c] *= g[h*d_head + c] (``elementwise_gate`` turns the logits into g, ``apply_output_gate``
   multiplies). Its W rows are megatron's linear_qkv rows (fused per query group after the queries) and a
   ``gate_proj`` Linear in Hugging Face; the bias exists where the QKV projection has one (OPT: yes; Qiu
   et al. and Llama: none).

Qiu et al.'s headwise form, g_h = sigmoid(x . w_h) with one w_h per head over the whole input x, is our
``shared_linear`` gate: its ``weight`` [H, d_model] holds their W, and its ``bias`` [H], which they do not
have, starts at logit(gate_init_prob) (0 for gate_init_prob 0.5) and is trained. Bondarenko et al.'s linear
and mlp gates read only head h's slice x_h.
"""

from __future__ import annotations

from typing import Mapping, Tuple

import torch

from .variants import GATE_FAMILIES, AttentionVariantConfig, check_choice, variant_tensors

HEAD_GATE_KINDS = tuple(k for k, family in GATE_FAMILIES.items() if family == "head")  # ``head_gate``'s kinds


def gate_parameter_names(kind: str) -> Tuple[str, ...]:
    """The names of a per-head ``kind`` gate's parameters in ``head_gate`` (``variants.variant_tensors``' ``name``)."""
    check_choice("gate", kind, HEAD_GATE_KINDS)
    return tuple(
        t.name for t in variant_tensors(AttentionVariantConfig(gate=kind), num_heads=1, head_dim=4, hidden_size=4)
    )


def head_gate(x: torch.Tensor, kind: str, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-head gate values g [..., H] in (0, 1), fp32 (fp64 for fp64 x), of the input x [..., width].

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
        xh = x.reshape(*x.shape[:-1], p["weight"].shape[0], -1)  # [..., H, d]
        logits = torch.einsum("...hd,hd->...h", xh, p["weight"]) + p["bias"]
    elif kind == "mlp":
        xh = x.reshape(*x.shape[:-1], p["fc1_weight"].shape[0], -1)
        hidden = torch.relu(torch.einsum("...hd,hrd->...hr", xh, p["fc1_weight"]) + p["fc1_bias"])
        logits = torch.einsum("...hr,hr->...h", hidden, p["fc2_weight"]) + p["fc2_bias"]
    else:
        raise ValueError(f"gate={kind!r}: head_gate has no math for it")
    return torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))


def elementwise_gate(logits: torch.Tensor) -> torch.Tensor:
    """The elementwise gate g = sigmoid(logits) in fp32 (fp64 for fp64 logits), from the gate's pre-activations
    x W^T + b (megatron's linear_qkv gate rows, Hugging Face's ``gate_proj`` output), any shape."""
    return torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))


def apply_output_gate(out: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """out [..., H, d] times gate [..., H] (per head) or [..., H, d] (elementwise), in out's dtype.

    The product runs in fp32 (fp64 for fp64), then rounds to out's dtype once, as megatron-core's
    ``_apply_output_gate`` (x * sigmoid(g.float()), cast back); the gate's gradient, a product of dOut and
    out, is also formed in fp32.
    """
    compute = torch.promote_types(out.dtype, torch.float32)
    g = gate.to(compute)
    if g.dim() == out.dim() - 1:
        g = g.unsqueeze(-1)
    return (out.to(compute) * g).to(out.dtype)


__all__ = ["HEAD_GATE_KINDS", "apply_output_gate", "elementwise_gate", "gate_parameter_names", "head_gate"]
