"""Non-finite values (NaN, +-inf): the one owner of the check and of its message.

Every place that must not accept a non-finite value (weights read or written, what flows through
training, calibration and int8 inference) calls :func:`require_finite`, so the rule and the wording
live here once:

    count_nonfinite(x)        how many elements of a tensor (or a Python number) are NaN or +-inf
    require_finite(x, what)   raise OutEffError ``<what>: <n> non-finite value(s) (nan/inf) of <numel>;
                              expected finite values`` when x holds any
"""

from __future__ import annotations

import math
from typing import Union

import torch

from megatron_outeff.errors import OutEffError

__all__ = ["count_nonfinite", "require_finite"]

Value = Union[torch.Tensor, float, int]


def count_nonfinite(x: Value) -> int:
    """Number of NaN / +-inf elements of ``x`` (0 for integer tensors and Python ints)."""
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.is_complex()):
            return 0
        return int((~torch.isfinite(x)).sum())
    return 0 if math.isfinite(float(x)) else 1


def require_finite(x: Value, what: str) -> None:
    """Raise :class:`OutEffError` naming ``what`` when ``x`` (a tensor or a number) holds NaN or +-inf.

    ``what`` says which value it is (a tensor name, ``"loss at iteration 12"``, ``"module 'fc1' input,
    calibration batch 3"``); the message adds the count and the total."""
    bad = count_nonfinite(x)
    if bad:
        if isinstance(x, torch.Tensor):
            raise OutEffError(f"{what}: {bad} non-finite value(s) (nan/inf) of {x.numel()}; expected finite values")
        raise OutEffError(f"{what} is {float(x)!r}; expected a finite value")
