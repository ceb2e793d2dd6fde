"""Shared pieces of the megatron-core integration tests and their torchrun worker: the tiny model they build.

(A uniquely named module, not conftest.py: the torchrun worker imports it too, and several test folders
have a conftest.)"""

import torch

# The tiny GPT every megatron test builds unless it says otherwise: 2 layers, hidden 64, 4 heads, FFN 128.
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128)
VOCAB, SEQ = 128, 16


def tiny_config(variant=None, **overrides):
    """megatron-core's TransformerConfig of the tiny model through the product's own builder
    (``models.common.megatron_transformer_config``: the TP/PP layout of parallel_state, every fusion flag
    off, what megatron sizes ``variant``'s parameters by), initialised on the CPU (the same weights at
    every layout and on any machine) with std 0.1 and no dropout. ``overrides``: TransformerConfig fields,
    applied last."""
    from megatron_outeff.models.common import megatron_transformer_config

    defaults = dict(use_cpu_initialization=True, init_method_std=0.1, hidden_dropout=0.0, attention_dropout=0.0)
    return megatron_transformer_config(TINY, {**defaults, **overrides}, variant)


def gpt(config, spec, seed=0, vocab_size=VOCAB, max_sequence_length=SEQ, **kwargs):
    """megatron-core's GPTModel of ``config`` and layer ``spec``, its weights drawn after
    ``torch.manual_seed(seed)``; ``kwargs``: GPTModel's (pre_process, post_process)."""
    from megatron.core.models.gpt import GPTModel

    torch.manual_seed(seed)
    return GPTModel(
        config, transformer_layer_spec=spec, vocab_size=vocab_size, max_sequence_length=max_sequence_length, **kwargs
    )
