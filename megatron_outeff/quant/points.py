"""QuantPoint: a named no-op marking a tensor that the simulated W8A8 protocol quantizes.

Parts of the project insert QuantPoints where a W8A8 deployment materialises a tensor that no
nn.Linear / nn.LayerNorm / nn.Embedding produces: Q K^T, the softmax output, P V and residual sums.
In float it is an identity; `apply_simulated_w8a8` attaches an activation quantizer to its output.
"""
from torch import nn

__all__ = ["QuantPoint"]


class QuantPoint(nn.Identity):
    """Identity whose output the simulated W8A8 protocol quantizes. `tag` is for humans only."""

    def __init__(self, tag: str = ""):
        super().__init__()
        self.tag = tag

    def extra_repr(self) -> str:
        return f"tag={self.tag!r}" if self.tag else ""
