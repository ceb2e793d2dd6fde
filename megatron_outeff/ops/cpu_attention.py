"""CPU attention (``cpu_outeff_attention``: ``outeff_attention(impl="cpu")``): unclipped variants on
torch's fused CPU kernel (``sdpa_attention``, the one implementation of the sink on torch's fused
kernels for every device), clipped ones on a lean materialised path (``clipped_outeff_attention``).

Clipped softmax needs the normalised P before clipping, which a flash pass never has: those variants
stay materialised, with the softmax done in place on one score buffer and only P saved for the
backward.

Not served (``cpu_unsupported_reason``): dropout (the fused CPU kernel has no RNG state to hand to
its backward, and the clipped path has none either), non-CPU tensors. ``outeff_attention(impl="auto")``
sends those to the PyTorch reference.
"""

from __future__ import annotations

from typing import Optional

import torch

from .sdpa_attention import sdpa_outeff_attention
from .variants import Clip

_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def cpu_unsupported_reason(device: torch.device, dropout_p: float) -> Optional[str]:
    """Why the CPU paths cannot run these arguments, or None if they can."""
    if _FWD is None:
        return f"torch {torch.__version__} has no aten::_scaled_dot_product_flash_attention_for_cpu"
    if device.type != "cpu":
        return f"the CPU paths need CPU tensors, got {device}"
    if dropout_p > 0:
        return f"dropout_p={dropout_p}: the fused CPU kernel has no dropout (the reference, impl='torch', has)"
    return None


def cpu_outeff_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    clip: Optional[Clip] = None,
    sink: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``outeff_attention(impl="cpu")``: q [b, sq, h, d], k/v [b, sk, h_kv, d] -> [b, sq, h, d] in q's dtype.

    Unclipped: torch's CPU flash kernel (``sdpa_attention.sdpa_outeff_attention``); clipped: the lean
    materialised path (``clipped_outeff_attention``). sink: [h] sink logits (None = vanilla;
    differentiable for the learnable offset). gate [b, sq, h] multiplies each head's output. mask:
    dense bool (True = masked out). Arguments are assumed validated by ``outeff_attention``; dropout
    is not served (see ``cpu_unsupported_reason``). Errors: those of the kernel.
    """
    if clip is not None:
        return clipped_outeff_attention(q, k, v, scale, clip, sink, gate, causal, key_padding_mask, mask)
    return sdpa_outeff_attention(
        q,
        k,
        v,
        scale=scale,
        sink=sink,
        gate=gate,
        causal=causal,
        key_padding_mask=key_padding_mask,
        mask=mask,
        kernel="cpu_flash",
    )


class _ClippedAttention(torch.autograd.Function):
    """Materialised clipped attention with one saved [b, h, sq, sk] matrix (the unclipped P).

    q [b, h, sq, d], k/v [b, h, sk, d] (kv heads already expanded), fp32 or fp64 -> out [b, h, sq, d].
    Forward: S = scale q k^T, masked; P = exp(S - m) / (exp(a - m) + sum exp(S - m)) in place;
    P' = clip((zeta - gamma) P + gamma, 0, 1); out = P' V. Backward (recomputing P' from P):
    dV = P'^T dO; dP = (zeta - gamma) [0 <= (zeta - gamma) P + gamma <= 1] dO V^T (torch.clamp's
    inclusive pass-through); D = rowsum(P * dP); dS = P (dP - D); d a = -sum_rows P_sink D.
    """

    @staticmethod
    def forward(ctx, q, k, v, sink, scale, clip, mask):
        s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # the one [sq, sk] buffer
        if mask is not None:
            s.masked_fill_(mask, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        a = None
        if sink is not None:
            a = sink.detach().to(s.dtype).view(1, -1, 1, 1)
            m = torch.maximum(m, a)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked rows
        p = s.sub_(m).exp_()
        denom = p.sum(dim=-1, keepdim=True)
        p_sink = None
        if a is not None:
            e_sink = torch.exp(a - m)
            denom = denom + e_sink
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
        p.div_(denom)
        if a is not None:
            p_sink = e_sink / denom  # [b, h, sq, 1]
        out = torch.matmul(_clipped(p, clip), v)
        ctx.save_for_backward(q, k, v, p, p_sink, sink)
        ctx.scale, ctx.clip = scale, clip
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p, p_sink, sink = ctx.saved_tensors
        clip = ctx.clip
        dout = dout.to(p.dtype)
        width = clip.zeta - clip.gamma
        buf = torch.mul(p, width).add_(clip.gamma)  # T = (zeta - gamma) P + gamma
        inside = (buf >= 0) & (buf <= 1)
        dv = torch.matmul(buf.clamp_(0.0, 1.0).transpose(-1, -2), dout)  # P'^T dO
        dp = torch.matmul(dout, v.transpose(-1, -2), out=buf).mul_(inside).mul_(width)
        delta = torch.matmul(p.unsqueeze(-2), dp.unsqueeze(-1)).squeeze(-1)  # D = rowsum(P * dP), [.., sq, 1]
        ds = dp.sub_(delta).mul_(p).mul_(ctx.scale)
        dq = torch.matmul(ds, k)
        dk = torch.matmul(ds.transpose(-1, -2), q)
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            dsink = -(p_sink * delta).sum(dim=(0, 2, 3)).to(sink.dtype)
        return dq, dk, dv, dsink, None, None, None


def _clipped(p: torch.Tensor, clip: Clip) -> torch.Tensor:
    return torch.mul(p, clip.zeta - clip.gamma).add_(clip.gamma).clamp_(0.0, 1.0)


def clipped_outeff_attention(q, k, v, scale, clip, sink, gate, causal, key_padding_mask, mask) -> torch.Tensor:
    """Clipped variants on CPU (arguments: ``cpu_outeff_attention``).

    Materialised (the clip needs the normaliser first) but lean: math in fp32 (fp64 for fp64), scale,
    mask, softmax and clip in place on one [b, h, sq, sk] buffer, only the unclipped P saved for the
    backward (the reference keeps about five such matrices alive). No dropout (the reference serves it).
    """
    from .reference import build_mask, expand_kv_heads

    b, sq, h, _ = q.shape
    sk = k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qt = q.transpose(1, 2).to(compute)
    kt = expand_kv_heads(k, h).transpose(1, 2).to(compute)
    vt = expand_kv_heads(v, h).transpose(1, 2).to(compute)
    mask = build_mask(b, sq, sk, causal, key_padding_mask, q.device, mask)
    out = _ClippedAttention.apply(qt, kt, vt, sink, scale, clip, mask).transpose(1, 2)
    if gate is not None:
        out = out * gate.to(compute).unsqueeze(-1)
    return out.to(q.dtype).contiguous()
