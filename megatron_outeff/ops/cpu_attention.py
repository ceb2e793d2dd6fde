"""CPU attention: every unclipped softmax variant on torch's fused flash-attention kernel, clipped ones
on a lean materialised path (``cpu_outeff_attention``: ``outeff_attention(impl="cpu")``, what
``impl="auto"`` runs on CPU).

torch's CPU flash kernel (``aten::_scaled_dot_product_flash_attention_for_cpu``, what
``F.scaled_dot_product_attention`` runs on CPU) computes vanilla attention in blocks, never
materialising the [sq, sk] matrix, and returns the output O_v with the row log-normaliser
L_v = log sum_j exp(s q.k_j) (fp32 for fp16/bf16 inputs). A sink logit a_h changes only the normaliser
(field notes section 1):

    L   = logaddexp(L_v, a_h)                   true log-normaliser, sink included
    out = O_v * exp(L_v - L) = O_v * sigmoid(L_v - a_h)
    P_sink = exp(a_h - L) = sigmoid(a_h - L_v)

Backward (FlashAttention-2, unchanged by the sink once L includes it): the kernel's backward
``_scaled_dot_product_flash_attention_for_cpu_backward(dO, q, k, v, out, L)`` recomputes
P = exp(s q.k - L) from the L it is given and forms D = rowsum(dO * out) from the out it is given,
so passing the sink-including (out, L) yields the exact gradients of q, k, v. The offset's gradient
is d a_h = - sum over batch and rows of P_sink * D. Memory stays linear in sq: the only extra
tensors are [b, h, sq] row statistics and one [b, h, sq, d] output copy.

Masks: ``causal`` with sq == sk uses the kernel's own causal mode (it skips masked blocks); causal
with sq != sk (bottom-right aligned, see ``reference.causal_mask``) and key padding become an
additive -inf bias of q's dtype ([1|b, 1, sq|1, sk]; the kernel broadcasts it); a dense ``mask``
is combined with them into one bias of its shape. Rows with no visible
key (all keys padded, or causal with sq > sk) are set to exactly zero output with a finite L, so the
recomputed P is 0 there and every gradient is exactly 0, for every variant.
GQA is native: the kernel maps query head h to kv head h // (h / h_kv) in both directions.

Clipped softmax needs the normalised P before clipping, which a flash pass never has: those variants
stay materialised (``clipped_outeff_attention``), with the softmax done in place on one score buffer
and only P saved for the backward.

Not served (``cpu_unsupported_reason``): dropout (the kernel has none, and dropout applies to the
normalised P), non-CPU tensors. ``outeff_attention(impl="auto")`` sends those to the PyTorch reference.
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import causal_mask
from .variants import Clip

_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def cpu_unsupported_reason(device: torch.device, dropout_p: float) -> Optional[str]:
    """Why the CPU paths cannot run these arguments, or None if they can."""
    if _FWD is None or _BWD is None:
        return f"torch {torch.__version__} has no aten::_scaled_dot_product_flash_attention_for_cpu"
    if device.type != "cpu":
        return f"the CPU paths need CPU tensors, got {device}"
    if dropout_p > 0:
        return f"dropout_p={dropout_p}: the fused CPU kernel has no dropout (the reference, impl='torch', has)"
    return None


def _kernel_masks(b, sq, sk, causal, key_padding_mask, dtype, device, mask=None):
    """(is_causal for the kernel, additive bias or None, visible-row mask [b|1, 1|h, sq|1] or None).

    The visible-row mask is None when every row sees at least one key. A dense ``mask`` (True =
    masked out) is combined with the others into one bias of its shape."""
    if mask is not None:
        from .reference import build_mask

        combined = build_mask(b, sq, sk, causal, key_padding_mask, device, mask)
        bias = torch.zeros(combined.shape, dtype=dtype, device=device).masked_fill_(combined, float("-inf"))
        visible = ~combined.all(dim=-1)
        return False, bias, (None if bool(visible.all()) else visible)
    is_causal = causal and sq == sk
    bias = None
    if causal and sq != sk:
        bias = torch.zeros(1, 1, sq, sk, dtype=dtype, device=device).masked_fill_(
            causal_mask(sq, sk, device).view(1, 1, sq, sk), float("-inf"))
    if key_padding_mask is not None:
        pad = torch.zeros(b, 1, 1, sk, dtype=dtype, device=device).masked_fill_(
            ~key_padding_mask.view(b, 1, 1, sk), float("-inf"))
        bias = pad if bias is None else bias + pad
    visible = None
    if key_padding_mask is not None or (causal and sq > sk):
        # index of the last key row i may see; the row is visible iff a real key lies at or before it
        last = torch.arange(sq, device=device) + (sk - sq) if causal else torch.full((sq,), sk - 1, device=device)
        visible = (last >= 0).view(1, sq).expand(b, sq)
        if key_padding_mask is not None:
            real_before = key_padding_mask.cumsum(-1)                              # [b, sk]
            visible = visible & (real_before[:, last.clamp(min=0)] > 0)
        visible = visible.reshape(b, 1, sq)
    return is_causal, bias, visible


class _FlashSinkAttention(torch.autograd.Function):
    """q [b, h, sq, d], k/v [b, h_kv, sk, d] (strided views allowed) -> out [b, h, sq, d]."""

    @staticmethod
    def forward(ctx, q, k, v, sink, scale, is_causal, bias, visible):
        # Element-wise work on [b, h, sq, d] tensors is kept to one multiply (and one matmul in the
        # backward): on a loaded CPU every parallel region costs up to a scheduler time slice, and
        # torch.exp opens one even on small tensors; sigmoid and logaddexp do not.
        out, lse = _FWD(q, k, v, 0.0, is_causal, attn_mask=bias, scale=scale)
        p_sink = None
        if sink is not None:
            a = sink.detach().to(lse.dtype).view(1, -1, 1)
            keep = torch.sigmoid(lse - a)                       # 1 - P_sink, [b, h, sq]
            p_sink = torch.sigmoid(a - lse)                     # P_sink = exp(a - L)
            lse = torch.logaddexp(lse, a)
            out = out * keep.unsqueeze(-1) if out.dtype == keep.dtype else (out.to(keep.dtype) * keep.unsqueeze(-1)).to(q.dtype)
        if visible is not None:
            out = out.masked_fill(~visible.unsqueeze(-1), 0.0)
            lse = lse.masked_fill(~visible, 0.0)                # finite: recomputed P = exp(-inf - 0) = 0
        ctx.save_for_backward(q, k, v, out, lse, sink, p_sink)
        ctx.scale, ctx.is_causal, ctx.bias = scale, is_causal, bias
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sink, p_sink = ctx.saved_tensors
        dout = dout.to(out.dtype)
        dq, dk, dv = _BWD(dout, q, k, v, out, lse, 0.0, ctx.is_causal, attn_mask=ctx.bias, scale=ctx.scale)
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            delta = _row_dot(dout.to(lse.dtype), out.to(lse.dtype))                      # D = rowsum(dO * out)
            dsink = -(p_sink * delta).sum(dim=(0, 2)).to(sink.dtype)                     # -sum P_sink * D
        return dq, dk, dv, dsink, None, None, None, None


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_d x * y for [b, h, s, d] tensors -> [b, h, s], as one batched matmul over the memory order
    [b, s, h, d] that the kernel's output and its gradient have (no copies, one parallel region)."""
    xt, yt = x.transpose(1, 2), y.transpose(1, 2)
    if not (xt.is_contiguous() and yt.is_contiguous()):
        xt, yt = xt.contiguous(), yt.contiguous()
    return torch.matmul(xt.unsqueeze(-2), yt.unsqueeze(-1)).reshape(xt.shape[:-1]).transpose(1, 2)


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

    Unclipped: torch's CPU flash kernel (``sdpa_outeff_attention``); clipped: the lean materialised
    path (``clipped_outeff_attention``). sink: [h] sink logits (None = vanilla; differentiable for the
    learnable offset). gate [b, sq, h] multiplies each head's output. mask: dense bool (True = masked
    out). Arguments are assumed validated by ``outeff_attention``; dropout is not served (see
    ``cpu_unsupported_reason``). Errors: those of the kernel.
    """
    if clip is not None:
        return clipped_outeff_attention(q, k, v, scale, clip, sink, gate, causal, key_padding_mask, mask)
    return sdpa_outeff_attention(q, k, v, scale, sink, gate, causal, key_padding_mask, mask)


def sdpa_outeff_attention(q, k, v, scale, sink, gate, causal, key_padding_mask, mask) -> torch.Tensor:
    """Unclipped variants on torch's CPU flash kernel (arguments: ``cpu_outeff_attention``); a dense
    mask becomes an additive bias of its shape."""
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    is_causal, bias, visible = _kernel_masks(b, sq, sk, causal, key_padding_mask, q.dtype, q.device, mask)
    out = _FlashSinkAttention.apply(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sink, scale, is_causal, bias, visible
    ).transpose(1, 2)                                           # [b, sq, h, d]
    if gate is not None:
        # in fp32 for fp16/bf16: the gate's gradient rowsum(dO * out) would otherwise sum products
        # rounded to the low precision (relative error ~ eps * sqrt(d) after cancellation)
        compute = torch.promote_types(out.dtype, torch.float32)
        out = (out.to(compute) * gate.to(compute).unsqueeze(-1)).to(q.dtype)
    return out.contiguous()


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
        s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)                       # the one [sq, sk] buffer
        if mask is not None:
            s.masked_fill_(mask, float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        a = None
        if sink is not None:
            a = sink.detach().to(s.dtype).view(1, -1, 1, 1)
            m = torch.maximum(m, a)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))                 # fully masked rows
        p = s.sub_(m).exp_()
        denom = p.sum(dim=-1, keepdim=True)
        p_sink = None
        if a is not None:
            e_sink = torch.exp(a - m)
            denom = denom + e_sink
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
        p.div_(denom)
        if a is not None:
            p_sink = e_sink / denom                                                 # [b, h, sq, 1]
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
        buf = torch.mul(p, width).add_(clip.gamma)                                  # T = (zeta - gamma) P + gamma
        inside = (buf >= 0) & (buf <= 1)
        dv = torch.matmul(buf.clamp_(0.0, 1.0).transpose(-1, -2), dout)             # P'^T dO
        dp = torch.matmul(dout, v.transpose(-1, -2), out=buf).mul_(inside).mul_(width)
        delta = torch.matmul(p.unsqueeze(-2), dp.unsqueeze(-1)).squeeze(-1)         # D = rowsum(P * dP), [.., sq, 1]
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
