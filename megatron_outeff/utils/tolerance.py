"""Rounding bounds derived from the dtype's epsilon, the magnitude and the depth of a computation, never
tuned to one machine: the one owner of the rule, used by the product's own consistency checks (the
Hugging Face export's reload check) and by the test suite (tests/tolerance.py builds on it).

Two computations of the same values in one floating-point dtype (the code under test and an oracle,
or two code paths) differ by rounding only. Each output accumulates at most ``n`` roundings, each at
most eps (``torch.finfo(dtype).eps``, twice the unit roundoff: both sides round) relative to the
terms it combines, whose absolute values sum to at most ``magnitude``. The worst-case bound of a
length-n summation (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., sec. 4.2) is

    |a - b| <= n * eps * magnitude

It holds whatever order a kernel sums in (other CPUs' vector widths - ATEN_CPU_CAPABILITY default /
avx2 / avx512 -, thread counts, TP/PP splits, cached vs. recomputed keys, padded vs. unpadded
shapes), which is what changes between machines. ``n`` is the longest chain of roundings behind one
output: for a network, the sum of the reduction lengths it passes through (:func:`network_depth`).

Checks that are structural (two paths that must agree exactly in exact arithmetic) run in float64,
where this bound is ~1e-11 relative even for deep networks and any real mistake (a mask, a position,
a cache entry wrong) is many orders of magnitude above it.

    rounding_bound(dtype, magnitude, n=1)            n * eps(dtype) * magnitude
    network_depth(hidden, ffn, layers, seq_length)   n for a pre-/post-LN decoder of that shape
"""

from __future__ import annotations

import torch

__all__ = ["network_depth", "rounding_bound"]


def rounding_bound(dtype: torch.dtype, magnitude: float, n: int = 1) -> float:
    """n * eps(dtype) * magnitude: see the module docstring."""
    return n * torch.finfo(dtype).eps * float(magnitude)


def network_depth(hidden: int, ffn: int, layers: int, seq_length: int) -> int:
    """``n`` for a decoder with hidden size h, FFN width f and L layers at sequence length s: each layer
    reduces over h (Q/K/V projections, the out-projection, LayerNorm's mean and variance, 4h in all),
    s (the scores' softmax normaliser and the weighted sum of values, 2s) and f (the second FFN
    projection), plus h for the first FFN projection; the LM head reduces over h once more.

    First order: LayerNorm renormalises its input, so the relative error it passes on is that of its
    input (plus its own reductions, counted above) - errors add over layers rather than multiply."""
    h, f, L, s = int(hidden), int(ffn), int(layers), int(seq_length)
    return L * (4 * h + 2 * s + f + h) + h
