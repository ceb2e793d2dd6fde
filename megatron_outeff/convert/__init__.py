"""Checkpoint conversion: training checkpoints (any TP/PP, any ZeRO stage) <-> other layouts <-> Hugging Face.

See megatron_outeff/convert/README.md; CLI: tools/convert_checkpoint.py.
"""
from .core import from_hf, load_into_model, reshard, to_hf
from .model_files import ConvertError, make_manifest, read_model_files, resolve_model_dir

__all__ = ["ConvertError", "from_hf", "load_into_model", "make_manifest", "read_model_files", "reshard",
           "resolve_model_dir", "to_hf"]
