"""What the two Triton kernel files (``flash_attention.py``, ``row_softmax.py``) share: the description
of a kernel launch (``KernelLaunch``, which ``triton_compile`` compiles ahead of time exactly as it will
run) and its runner, and the @triton.jit blocks of the softmax and of the clip. (Interpreter detection
lives in ``triton_env.interpreting``: asking must not import Triton.)

A @triton.jit helper is inlined into the kernel that calls it and its tl.constexpr arguments are
resolved at compile time, so a kernel compiles to the same code as with the block written out.
Math: field notes section 1 and ``variants.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

import triton
import triton.language as tl


@dataclass
class KernelLaunch:
    """One kernel launch as the launcher makes it (and as the ahead-of-time compile check compiles it).

    kind: the launcher's name for the kernel (flash: ``KERNELS``); args: positional arguments (tensors, stride tuples, ints, floats);
    meta: the tl.constexpr flags other than the tiles; grid: config kwargs -> grid; configs: the
    candidates (flash: ``kernel_configs``; the first is the default); reset_to_zero: arguments the kernel accumulates into (atomics),
    zeroed before each autotuning trial; tune_key: what, besides the flags and dtypes, keys tuning."""

    kernel: Any
    kind: str
    args: tuple
    meta: Dict[str, Any]
    grid: Callable[[Dict[str, Any]], Tuple[int, ...]]
    configs: Tuple[triton.Config, ...]
    reset_to_zero: Tuple[str, ...] = ()
    tune_key: tuple = field(default_factory=tuple)


_TUNERS: Dict[tuple, Any] = {}


def run_launch(launch: KernelLaunch) -> None:
    """Launches one kernel: the first candidate when there is one (interpreter) or autotuning is off
    (``OUTEFF_FLASH_AUTOTUNE=0``, which every Triton kernel of ours honours), else ``triton.autotune`` over the candidates, one tuner per
    (kernel, tune_key) keyed by the flags and the dtypes."""
    if len(launch.configs) == 1 or os.environ.get("OUTEFF_FLASH_AUTOTUNE", "1") == "0":
        cfg = launch.configs[0]
        launch.kernel[launch.grid(cfg.kwargs)](
            *launch.args, **launch.meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
        return
    key = (launch.kernel.__name__, launch.configs, launch.tune_key)
    tuner = _TUNERS.get(key)
    if tuner is None:
        tuner = triton.autotune(
            configs=list(launch.configs), key=sorted(launch.meta), reset_to_zero=list(launch.reset_to_zero) or None
        )(launch.kernel)
        _TUNERS[key] = tuner
    tuner[launch.grid](*launch.args, **launch.meta)


@triton.jit
def online_softmax_step(m_i, l_i, s, BASE2: tl.constexpr):
    """One block of the online softmax (FlashAttention-2): the running row max m_i and row sum l_i
    [rows] updated with the logits s [rows, cols] (-inf where masked; base-2 logits when BASE2).

    The sink a_h enters as the initial state (m, l) = (a_h, 1); vanilla starts at (-inf, 0).
    Returns (m_new, l_new, alpha, p): alpha = e^(m_i - m_new) rescales what was accumulated with
    m_i, p = e^(s - m_new). A row with nothing seen yet (max -inf) is shifted by 0, so alpha and p
    are exact zeros, not NaN.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    if BASE2:
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
    else:
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), alpha, p


@triton.jit
def clip_probs(p, c, gamma):
    """Clipped softmax (Bondarenko et al. 2023): clamp(c * p + gamma, 0, 1), c = zeta - gamma."""
    return tl.minimum(tl.maximum(c * p + gamma, 0.0), 1.0)


@triton.jit
def clip_grad(p, g, c, gamma):
    """(clip_probs(p), the clip's chain rule g * d clip_probs(p) / dp): c * g where
    0 <= c * p + gamma <= 1, else 0 (torch.clamp's gradient passes through at both bounds
    inclusive, as the reference). A caller that needs only the gradient drops the first (the
    compiler removes it)."""
    lin = c * p + gamma
    return tl.minimum(tl.maximum(lin, 0.0), 1.0), tl.where((lin >= 0.0) & (lin <= 1.0), g * c, 0.0)
