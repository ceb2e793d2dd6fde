"""Tolerances derived from the dtype's epsilon and the magnitude, never tuned to one machine.

The rule and its derivation live in the product, ``megatron_outeff.utils.tolerance`` (its own reload
checks use it too): two computations of the same values in one dtype differ by at most
``n * eps(dtype) * magnitude``, n the longest chain of roundings behind one output. Structural
checks (two paths that must agree exactly in exact arithmetic) run in float64.
This module adds the test-side helpers: a HF-config form of ``network_depth``, ``assert_close_bound``
(the ratio in the message) and ``attention_bound``.
"""

import torch

from megatron_outeff.utils.tolerance import network_depth as _network_depth
from megatron_outeff.utils.tolerance import rounding_bound  # noqa: F401  (re-exported for the tests)

F32_EPS = torch.finfo(torch.float32).eps
F64_EPS = torch.finfo(torch.float64).eps


def network_depth(cfg: dict) -> int:
    """``n`` for a decoder described by a HF OPT config dict (hidden_size, ffn_dim, num_hidden_layers,
    max_position_embeddings as the sequence length, default 64): megatron_outeff.utils.tolerance.network_depth."""
    return _network_depth(
        cfg["hidden_size"], cfg["ffn_dim"], cfg["num_hidden_layers"], cfg.get("max_position_embeddings", 64)
    )


def assert_close_bound(actual: torch.Tensor, expected: torch.Tensor, bound: float, what: str = "") -> None:
    """max |actual - expected| <= bound, with the ratio in the message (how much room is left)."""
    diff = (actual.double() - expected.double()).abs().max().item()
    assert diff <= bound, f"{what} max |diff| {diff:.3e} > derived bound {bound:.3e}"


def attention_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dtype=torch.float32) -> float:
    """Bound on |o - o_exact| for softmax attention o = softmax(scale q k^T) v computed in ``dtype``
    (q, k: [b, s, h, d], v: [b, sk, h, d]; any number of extra always-zero sink keys).

    A score's error is at most d eps S, with S = max_ij scale sum_c |q_ic k_jc|; it moves each p_j by at
    most 2 d eps S relative (numerator and normaliser), the exponentials and the normaliser's sum add
    (sk + 1) eps relative, and the weighted sum of values sk eps max|v|:
        eps max|v| (2 d S + 2 sk + 1)."""
    d, sk = q.shape[-1], k.shape[1]
    qa = q.detach().double().abs().transpose(1, 2)
    ka = k.detach().double().abs().transpose(1, 2)
    if ka.shape[1] != qa.shape[1]:  # grouped-query attention: key heads repeat
        ka = ka.repeat_interleave(qa.shape[1] // ka.shape[1], dim=1)
    S = float((qa @ ka.transpose(-1, -2)).max()) * scale
    return torch.finfo(dtype).eps * float(v.detach().abs().max()) * (2 * d * S + 2 * sk + 1)
