"""What ``outeff_attention(impl="auto")`` runs: a pure function of the call's kind, testable without a GPU.

    auto_impl(device_type, softmax, clipped, dropout, dtype, head_dim, mask_kind) -> impl name

| device | variant | what runs |
|---|---|---|
| CUDA | unclipped, fp16 / bf16 / fp32, head dim <= 256 (any mask, dropout, GQA) | `sdpa`: torch's fused kernels (flash, cuDNN, memory-efficient: SDPA's choice) + the sink as the LSE rescale |
| CUDA | clipped, no dropout, no dense mask, a head dim the Triton kernel takes | `triton` (the flash kernel: the clip needs two passes) |
| CUDA | clipped with dropout or a dense mask, or a head dim no kernel above takes | `rowwise` (materialised scores + the fused row softmax) |
| CUDA | float64 | `torch` (no fused kernel has fp64) |
| CPU | unclipped, no dropout | `sdpa` (torch's fused CPU kernel) |
| CPU | clipped, no dropout | `cpu` (the lean materialised path) |
| CPU / other | dropout; other devices | `torch` (the reference) |

When torch itself finds no fused kernel for an ``sdpa`` call at run time (an old GPU, an unusual
stride), ``fallback_impl`` names what runs instead and ``sdpa_attention.warn_fallback`` warns once
and records it (``sdpa_backend_record``: "fallback:<impl>"), so a benchmark or the GPU check shows it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .variants import SOFTMAX_VARIANTS, check_choice

MASK_KINDS = ("none", "causal", "key_padding", "causal+key_padding", "dense")
SDPA_MAX_HEAD_DIM = 256  # torch's fused kernels' documented head dim limit (flash, cuDNN on sm_90)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def mask_kind(causal: bool, key_padding_mask: Optional[torch.Tensor], mask: Optional[torch.Tensor]) -> str:
    """The call's mask as one of ``MASK_KINDS``."""
    if mask is not None:
        return "dense"
    if key_padding_mask is not None:
        return "causal+key_padding" if causal else "key_padding"
    return "causal" if causal else "none"


def triton_takes_head_dim(head_dim: int) -> bool:
    """Whether the Triton flash kernel (``flash_attention.py``) takes this head dim."""
    from .flash_attention import supports_head_dim

    return supports_head_dim(head_dim)


def auto_impl(
    device_type: str, softmax: str, clipped: bool, dropout: bool, dtype: torch.dtype, head_dim: int, mask_kind: str
) -> str:
    """The implementation ``impl="auto"`` runs (module docstring's table). Errors: ValueError for a
    softmax or mask kind outside the vocabulary."""
    check_choice("softmax", softmax, SOFTMAX_VARIANTS)
    check_choice("mask_kind", mask_kind, MASK_KINDS)
    if device_type == "cuda":
        if dtype not in _FUSED_DTYPES:
            return "torch"
        if not clipped and head_dim <= SDPA_MAX_HEAD_DIM:
            return "sdpa"
        return fallback_impl(device_type, dropout, dtype, head_dim, mask_kind)
    if device_type != "cpu" or dropout:
        return "torch"
    return "cpu" if clipped else "sdpa"


def fallback_impl(device_type: str, dropout: bool, dtype: torch.dtype, head_dim: int, mask_kind: str) -> str:
    """What runs when torch's fused kernels do not serve a call (``sdpa_attention.SDPAUnavailable``)."""
    if device_type != "cuda" or dtype not in _FUSED_DTYPES:
        return "torch"
    if dropout or mask_kind == "dense" or not triton_takes_head_dim(head_dim):
        return "rowwise"
    return "triton"
