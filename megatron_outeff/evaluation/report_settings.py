"""How an outlier report measures (``ReportSettings``), without torch: tools/outlier_report.py builds its
options from it before anything heavy is imported; evaluation/report.py records it in the report as
``settings``. Errors: one-line OutEffError naming the field and the value."""

from __future__ import annotations

import dataclasses
import math

from megatron_outeff.errors import OutEffError


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    """How a report measures; recorded in it as ``settings`` (tools/outlier_report.py's options)."""

    batch_size: int = 8  # sequences per forward pass
    top_k: int = 8  # outlier channels listed per component
    n_sigma: float = 6.0  # outlier_share: |x - mu| > n_sigma * std (a Gaussian has ~2e-9 beyond 6)
    skip_quant: bool = False  # no FP16 / W8A8 perplexities

    def __post_init__(self):
        for name in ("batch_size", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OutEffError(f"ReportSettings.{name}={value!r}: expected a positive integer")
        n = self.n_sigma
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not (math.isfinite(n) and n > 0):
            raise OutEffError(f"ReportSettings.n_sigma={self.n_sigma!r}: expected a finite number > 0")
        if not isinstance(self.skip_quant, bool):
            raise OutEffError(f"ReportSettings.skip_quant={self.skip_quant!r}: expected true or false")
