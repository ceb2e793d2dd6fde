"""Tolerances derived from the dtype's epsilon and the magnitude, never tuned to one machine.

Two computations of the same values in one floating-point dtype (the code under test and an oracle,
or two code paths) differ by rounding only. Each output accumulates at most ``n`` roundings, each at
most eps (``torch.finfo(dtype).eps``, twice the unit roundoff: both sides round) relative to the
terms it combines, whose absolute values sum to at most ``magnitude``. The worst-case bound of a
length-n summation (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., sec. 4.2) is

    |a - b| <= n * eps * magnitude

It holds whatever order a kernel sums in (other CPUs' vector widths, thread counts, TP/PP splits,
cached vs. recomputed keys), which is what changes between machines. ``n`` is the longest chain of
roundings behind one output: for a network, the sum of the reduction lengths it passes through.

Checks that are structural (two paths that must agree exactly in exact arithmetic) run in float64,
where this bound is ~1e-12 and any real mistake is orders of magnitude above it.
"""
import torch

F32_EPS = torch.finfo(torch.float32).eps
F64_EPS = torch.finfo(torch.float64).eps


def rounding_bound(dtype: torch.dtype, magnitude: float, n: int = 1) -> float:
    """n * eps(dtype) * magnitude: see the module docstring."""
    return n * torch.finfo(dtype).eps * float(magnitude)


def network_depth(cfg: dict) -> int:
    """``n`` for a decoder with hidden size h, FFN width f and L layers at sequence length s (a HF OPT
    config dict): each layer reduces over h (QKV, out-projection, LayerNorm twice), s (scores and the
    weighted sum of values) and f (fc2), the LM head over h once more."""
    h, f, L = cfg["hidden_size"], cfg["ffn_dim"], cfg["num_hidden_layers"]
    s = cfg.get("max_position_embeddings", 64)
    return L * (4 * h + 2 * s + f + h) + h


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
