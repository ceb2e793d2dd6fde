"""Checkpoint conversion: training checkpoints (any TP/PP, any ZeRO stage) <-> other layouts <-> Hugging Face.

See megatron_outeff/convert/README.md; CLI: tools/convert_checkpoint.py. The checkpoint format itself
(model files, manifest, merge / split of TP/PP shards): megatron_outeff.checkpoint_format.
"""

from .core import from_hf, reshard, to_hf

__all__ = ["from_hf", "reshard", "to_hf"]
