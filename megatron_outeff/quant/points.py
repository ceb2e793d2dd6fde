"""Named activation sites for simulated quantization.

A ``QuantPoint`` is an identity in the float model. Models place one wherever the paper's W8A8
protocol quantizes an activation that is not the output of a Linear/Embedding/LayerNorm module:
Q K^T, the softmax output, P V and the residual sums. The simulated-quantization pass
(`apply_simulated_w8a8`) finds them with `is_quant_point` and attaches an activation fake-quantizer to their
output, so the model code itself never knows about quantization.
"""

import torch

__all__ = ["QuantPoint", "is_quant_point"]


class QuantPoint(torch.nn.Identity):
    """Identity marker for an activation the simulated W8A8 protocol quantizes.

    `tag` (optional) is for humans only: it shows in repr."""

    def __init__(self, tag: str = ""):
        super().__init__()
        self.tag = tag

    def extra_repr(self) -> str:
        return f"tag={self.tag!r}" if self.tag else ""


def is_quant_point(module: torch.nn.Module) -> bool:
    """True for a QuantPoint, including the copy of this class that a Hugging Face export ships
    beside its remote modeling code (a different class object with the same name and base)."""
    return isinstance(module, QuantPoint) or (
        type(module).__name__ == "QuantPoint" and isinstance(module, torch.nn.Identity)
    )
