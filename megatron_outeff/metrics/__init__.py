"""Outlier metrics (the paper's definitions) and a hook-based collector. No Megatron/DeepSpeed."""

from . import outliers
from .outliers import *  # noqa: F403  (the package's API is exactly outliers.__all__, its one list)

__all__ = list(outliers.__all__)
