"""Plain PyTorch implementation of outlier-efficient attention.

This is both the CPU execution path and the oracle the Triton kernels are tested against, so it
favours clarity over speed: it materialises the [b, h, sq, sk] score matrix and does all softmax
math in fp32, whatever the input dtype.

Math (per row of scores x, sink logit a = a_h or absent):
    m  = max(max_j x_j, a)                      # shift that keeps exp() finite in any dtype
    p_i = exp(x_i - m) / (exp(a - m) + sum_j exp(x_j - m))
A fully masked row has no finite logit: without a sink its probabilities are defined as 0
(zero output, zero gradient), with a sink they are exactly 0 already (numerator 0, normaliser 1).
"""

from __future__ import annotations

from typing import Optional

import torch

from .variants import Clip


def causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """Bool [sq, sk], True where query i may NOT see key j.

    Bottom-right aligned (as FlashAttention >= 2.1): query i sees keys j <= i + (sk - sq), so the
    last query sees every key. For sq == sk this is the usual lower-triangular mask.
    """
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return j > i + (sk - sq)


def outeff_softmax_reference(
    scores: torch.Tensor,
    *,
    scale: float = 1.0,
    sink: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    clip: Optional[Clip] = None,
) -> torch.Tensor:
    """Scale + mask + softmax variant + clip over the last dim of ``scores`` [b, h, sq, sk].

    sink: fp32 [h] sink logits (None = vanilla). mask: bool broadcastable to scores, True where a
    key is masked OUT (megatron-core's convention). Returns fp32 probabilities (fp64 for fp64 input).
    """
    x = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    if mask is not None:
        x = x.masked_fill(mask, float("-inf"))
    row_max = x.amax(dim=-1, keepdim=True)
    if sink is not None:
        a = sink.to(x.dtype).view(1, -1, 1, 1)
        m = torch.maximum(row_max, a)
    else:
        m = row_max
    # Fully masked rows (m = -inf without a sink): shift by 0 so exp() gives exact zeros, not NaN.
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(x - m)
    denom = e.sum(dim=-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(a - m)
    denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    p = e / denom
    if clip is not None:
        p = torch.clamp((clip.zeta - clip.gamma) * p + clip.gamma, 0.0, 1.0)
    return p


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[b, s, h_kv, d] -> [b, s, num_heads, d]; kv head j serves query heads j*g .. j*g+g-1."""
    h_kv = x.shape[2]
    if h_kv == num_heads:
        return x
    return x.repeat_interleave(num_heads // h_kv, dim=2)


def outeff_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sink: Optional[torch.Tensor] = None,
    clip: Optional[Clip] = None,
    gate: Optional[torch.Tensor] = None,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q [b, sq, h, d], k/v [b, sk, h_kv, d] -> [b, sq, h, d] in q's dtype (math in fp32).

    Arguments are assumed validated (see ``megatron_outeff.ops.outeff_attention``).
    gate [b, sq, h] multiplies each head's output after P @ V. mask: dense bool, True = masked out,
    combined with ``causal`` and ``key_padding_mask``.
    """
    b, sq, h, d = q.shape
    sk = k.shape[1]
    compute = compute_dtype(q.dtype)
    vf = expand_kv_heads(v, h).to(compute).transpose(1, 2)
    scores = attention_scores(q, k, compute)  # [b, h, sq, sk]
    mask = build_mask(b, sq, sk, causal, key_padding_mask, q.device, mask)
    p = outeff_softmax_reference(scores, scale=scale, sink=sink, mask=mask, clip=clip).to(compute)
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p, training=True)
    out = (p @ vf).transpose(1, 2)  # [b, sq, h, d]
    if gate is not None:
        out = out * gate.to(compute).unsqueeze(-1)
    return out.to(q.dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the softmax math: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention_scores(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Unscaled scores q k^T [b, h, sq, sk] in ``dtype`` of q [b, sq, h, d], k [b, sk, h_kv, d]."""
    qf = q.to(dtype).transpose(1, 2)  # [b, h, sq, d]
    kf = expand_kv_heads(k, q.shape[2]).to(dtype).transpose(1, 2)  # [b, h, sk, d]
    return qf @ kf.transpose(-1, -2)


def build_mask(b, sq, sk, causal, key_padding_mask, device, mask=None) -> Optional[torch.Tensor]:
    """Combined bool mask broadcastable to [b, h, sq, sk], True = masked out; None if nothing is masked.

    causal (bottom-right aligned), key_padding_mask [b, sk] (True = real token) and a dense ``mask``
    (True = masked out) are combined: a key is masked if any of them masks it."""
    combined = mask
    if causal:
        c = causal_mask(sq, sk, device).view(1, 1, sq, sk)
        combined = c if combined is None else (combined | c)
    if key_padding_mask is not None:
        pad = (~key_padding_mask).view(b, 1, 1, sk)
        combined = pad if combined is None else (combined | pad)
    return combined
