"""Whether Triton kernels run under Triton's CPU interpreter, asked without importing Triton: Triton reads
TRITON_INTERPRET when it decorates a @triton.jit function, so importing the kernel modules only to ask
would freeze that moment's setting for every later kernel (a test that flipped the variable broke the
interpreted kernels of every test after it)."""

from __future__ import annotations

import os

import torch

__all__ = ["interpreting"]


def interpreting(device: torch.device) -> bool:
    """True when Triton kernels on tensors of ``device`` run under Triton's CPU interpreter:
    TRITON_INTERPRET=1 (which Triton reads when the kernels are decorated) and a non-CUDA device."""
    return device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") == "1"
