"""The one list of benchmarked attention variants (``BENCH_VARIANTS``), used by tools/bench_attention.py
(attention op), tools/bench_layer.py (one megatron TransformerLayer) and tools/bench_train.py (the
training loop). A new variant worth measuring is one line here; each benchmark picks its default set
by name (``select``).

Clipping uses the paper's OPT form, clip_alpha = 12 (gamma = -12 / T, zeta = 1), with T the sequence
length of the run; gates start at the variant's default (sigmoid = 0.25).
"""

from __future__ import annotations

from typing import Dict, Iterable

import torch

from megatron_outeff.ops.variants import AttentionVariantConfig as _V

BENCH_VARIANTS: Dict[str, _V] = {
    "vanilla": _V(),
    "softmax1": _V(softmax="softmax1"),
    "softmax_n(n=2)": _V(softmax="softmax_n", softmax_n=2.0),
    "learnable": _V(softmax="learnable"),
    "clipped": _V(clip_alpha=12.0),
    "clipped softmax1": _V(softmax="softmax1", clip_alpha=12.0),
    "gated": _V(gate="linear"),
    "gated softmax1": _V(softmax="softmax1", gate="linear"),
    "gated(mlp)": _V(gate="mlp"),
    "gated(shared_linear)": _V(gate="shared_linear"),
}


def select(names: Iterable[str]) -> Dict[str, _V]:
    """{name: variant} for the given names, in their order; ValueError naming an unknown one."""
    out = {}
    for name in names:
        if name not in BENCH_VARIANTS:
            raise ValueError(f"benchmark variant {name!r}: expected one of {list(BENCH_VARIANTS)}")
        out[name] = BENCH_VARIANTS[name]
    return out


def config_overrides(variant: _V) -> list:
    """The training config's ``attention.<field>=<value>`` overrides that make ``variant`` (the fields
    that differ from the default variant)."""
    default = _V().to_dict()
    return [f"attention.{k}={v}" for k, v in variant.to_dict().items() if v != default[k]]


def attention_kwargs(
    variant: _V, *, b: int, s: int, h: int, device, dtype, requires_grad: bool = True, seed: int = 1
) -> dict:
    """Keyword arguments of ``outeff_attention`` for ``variant`` on q [b, s, h, d], causal self-attention
    of length s: softmax (+ a learnable offset [h] of zeros), clip (alpha form resolved at T = s), and
    a per-head gate [b, s, h] in (0, 1) for a gated variant (its gradient counts, as in training)."""
    kw = dict(variant.softmax_args(), causal=True, clip=variant.clip_pair(s))
    if variant.learnable_offset:
        kw["offset"] = torch.zeros(h, device=device, requires_grad=requires_grad)
    if variant.gated:
        g = torch.Generator(device="cpu").manual_seed(seed)
        gate = torch.rand(b, s, h, generator=g).mul_(0.98).add_(0.01)
        kw["gate"] = gate.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return kw


def attention_flops(b: int, s: int, h: int, d: int, causal: bool = True, backward: bool = True) -> float:
    """Matmul FLOPs of attention: 4 b h s^2 d forward (q k^T and P v), 2.5x that for the backward
    (FlashAttention-2's count: 5 products with recomputation, vs 2 forward), halved when causal."""
    fwd = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    return fwd * (3.5 if backward else 1.0)
