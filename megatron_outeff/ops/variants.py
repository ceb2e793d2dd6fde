"""Softmax variants and argument validation shared by every attention implementation.

All variants are one formula with a per-head "sink" logit a_h added to the normaliser:

    p_i = exp(x_i) / (exp(a_h) + sum_j exp(x_j))

    vanilla    no sink (a_h = -inf)
    softmax1   a_h = 0            (Softmax_1, the OutEffHop layer)
    softmax_n  a_h = log(n)       (n >= 0 real; n = 0 is vanilla)
    learnable  a_h = offset[h]    (a parameter that receives a gradient; megatron-core's
                                   softmax_type='learnable', gpt-oss "sinks")

Equivalently: one extra key with logit a_h whose value vector is zero. It changes only the
normaliser, never the output direction.

Optional clipping (Bondarenko et al. 2023) maps each probability through
clip((zeta - gamma) * p + gamma, 0, 1) with gamma <= 0 and zeta >= 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

SOFTMAX_VARIANTS = ("vanilla", "softmax1", "softmax_n", "learnable")
IMPLEMENTATIONS = ("auto", "torch", "cpu", "triton", "rowwise")


@dataclass(frozen=True)
class Clip:
    """Clipped softmax parameters: clip((zeta - gamma) * p + gamma, 0, 1)."""

    gamma: float
    zeta: float

    @staticmethod
    def parse(clip) -> Optional["Clip"]:
        if clip is None:
            return None
        if isinstance(clip, Clip):
            gamma, zeta = clip.gamma, clip.zeta
        else:
            try:
                gamma, zeta = (float(v) for v in clip)
            except (TypeError, ValueError):
                raise ValueError(f"clip={clip!r}: expected None or a pair (gamma, zeta) of floats") from None
        if not (math.isfinite(gamma) and math.isfinite(zeta)):
            raise ValueError(f"clip={clip!r}: gamma and zeta must be finite")
        if gamma > 0:
            raise ValueError(f"clip gamma={gamma}: expected gamma <= 0")
        if zeta < 1:
            raise ValueError(f"clip zeta={zeta}: expected zeta >= 1")
        return Clip(gamma, zeta)


def resolve_sink(
    softmax: str,
    n: float,
    offset: Optional[torch.Tensor],
    num_heads: int,
    device: torch.device,
) -> Optional[torch.Tensor]:
    """The per-head sink logit a_h as an fp32 tensor [num_heads], or None for vanilla softmax.

    For ``learnable`` the returned tensor is ``offset`` promoted to at least fp32 (a differentiable
    cast, so gradients flow to ``offset``; an fp64 offset stays fp64 for gradcheck).
    """
    if softmax not in SOFTMAX_VARIANTS:
        raise ValueError(f"softmax={softmax!r}: expected one of {SOFTMAX_VARIANTS}")
    if softmax == "learnable":
        if offset is None:
            raise ValueError("offset=None: softmax='learnable' needs an offset tensor of shape [heads]")
        if not isinstance(offset, torch.Tensor) or offset.shape != (num_heads,):
            shape = tuple(offset.shape) if isinstance(offset, torch.Tensor) else type(offset).__name__
            raise ValueError(f"offset shape {shape}: expected ({num_heads},), one value per query head")
        if offset.device != device:
            raise ValueError(f"offset on {offset.device}: expected the device of q ({device})")
        return offset.to(torch.promote_types(offset.dtype, torch.float32))
    if offset is not None:
        raise ValueError(f"offset given with softmax={softmax!r}: an offset is only used with softmax='learnable'")
    if softmax == "vanilla":
        return None
    if softmax == "softmax1":
        value = 0.0
    else:  # softmax_n
        try:
            n = float(n)
        except (TypeError, ValueError):
            raise ValueError(f"n={n!r}: expected a real number >= 0") from None
        if not (math.isfinite(n) and n >= 0):
            raise ValueError(f"n={n}: expected a finite real number >= 0")
        if n == 0:
            return None  # softmax_0 is vanilla softmax
        value = math.log(n)
    return torch.full((num_heads,), value, dtype=torch.float32, device=device)


def check_float_tensor(name: str, t, layout: str) -> None:
    """ValueError naming ``name`` unless t is a rank-4 torch.Tensor (``layout``, e.g. "[batch, seq,
    heads, head_dim]") of float32, float16, bfloat16 or float64."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} has rank {t.dim()} (shape {tuple(t.shape)}): expected rank 4 {layout}")
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise ValueError(f"{name} dtype {t.dtype}: expected float32, float16, bfloat16 (or float64)")


def validate_attention_args(q, k, v, gate, key_padding_mask, scale, dropout_p, impl) -> Tuple[int, int, int, int, int, float]:
    """Check shapes/dtypes/devices of the attention inputs. Returns (b, sq, sk, h, h_kv, scale)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t, "[batch, seq, heads, head_dim]")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}: expected one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"devices q={q.device}, k={k.device}, v={v.device}: expected one device")
    b, sq, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k shape {tuple(k.shape)} and v shape {tuple(v.shape)}: expected equal shapes")
    bk, sk, h_kv, dk = k.shape
    if bk != b:
        raise ValueError(f"k batch {bk}: expected q's batch {b}")
    if dk != d:
        raise ValueError(f"k head_dim {dk}: expected q's head_dim {d}")
    if h_kv == 0 or h % h_kv != 0:
        raise ValueError(f"kv heads {h_kv}: expected a divisor of the {h} query heads")
    if gate is not None:
        if not isinstance(gate, torch.Tensor) or gate.shape != (b, sq, h):
            shape = tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__
            raise ValueError(f"gate shape {shape}: expected ({b}, {sq}, {h}) = [batch, sq, heads]")
        if gate.device != q.device:
            raise ValueError(f"gate on {gate.device}: expected the device of q ({q.device})")
        if not gate.is_floating_point():
            raise ValueError(f"gate dtype {gate.dtype}: expected a floating dtype with values in (0, 1)")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            what = key_padding_mask.dtype if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__
            raise ValueError(f"key_padding_mask dtype {what}: expected torch.bool, True for real tokens")
        if key_padding_mask.shape != (b, sk):
            raise ValueError(f"key_padding_mask shape {tuple(key_padding_mask.shape)}: expected ({b}, {sk}) = [batch, sk]")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask on {key_padding_mask.device}: expected the device of q ({q.device})")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale={scale}: expected a finite positive number")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p={dropout_p}: expected 0 <= dropout_p < 1")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl={impl!r}: expected one of {IMPLEMENTATIONS}")
    return b, sq, sk, h, h_kv, scale
