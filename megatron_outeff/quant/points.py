"""Named activation sites for simulated quantization.

A ``QuantPoint`` is an identity in the float model. Models place one wherever the paper's W8A8
protocol quantizes an activation that is not the output of a Linear/Embedding/LayerNorm module:
Q K^T, the softmax output, P V and the residual sums. The simulated-quantization pass finds them
by type and swaps in activation fake-quantizers, so the model code itself never knows about
quantization.
"""
import torch


class QuantPoint(torch.nn.Identity):
    """Identity marker for an activation the simulated W8A8 protocol quantizes."""
