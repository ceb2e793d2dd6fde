"""megatron-core integration: outlier-efficient attention through ModuleSpecs. Knows nothing of DeepSpeed.

Public API (imported lazily: ``import megatron.core`` costs seconds):
    AttentionVariantConfig                       variant.py     the typed variant (owner: megatron_outeff.ops.variants)
    from_megatron_softmax_type, megatron_softmax_type   variant.py  (the translator to/from megatron's softmax_type)
    get_outeff_layer_spec(variant, *, qk_layernorm, seq_length, normalization)   layer_spec.py
    get_outeff_block_spec(config, variant, ...)  layer_spec.py  (final norm usable with SP without apex)
    replace_self_attention(layer_spec, variant)  layer_spec.py  (any TransformerLayer spec, e.g. TE's)
    variant_from_megatron(config)                variant.py     (megatron config.softmax_type -> variant)
    OutEffCoreAttention                          core_attention.py  (drop-in DotProductAttention)
    OutEffSelfAttention, OutEffHeadGate          self_attention.py
    TorchNorm                                    layer_spec.py
    init_model_parallel, shutdown_distributed (the end of a process), apply_cpu_patches,
    cpu_safe_forward_backward_func
"""

import importlib

_EXPORTS = {
    "AttentionVariantConfig": "variant",
    "get_outeff_layer_spec": "layer_spec",
    "get_outeff_block_spec": "layer_spec",
    "replace_self_attention": "layer_spec",
    "variant_from_megatron": "variant",
    "from_megatron_softmax_type": "variant",
    "megatron_softmax_type": "variant",
    "TorchNorm": "layer_spec",
    "OutEffCoreAttention": "core_attention",
    "check_variant_fits": "core_attention",
    "OutEffSelfAttention": "self_attention",
    "OutEffHeadGate": "self_attention",
    "check_state_dict_fits": "self_attention",
    "install_state_dict_guard": "self_attention",
    "init_model_parallel": "parallel",
    "destroy_model_parallel": "parallel",
    "shutdown_distributed": "parallel",
    "apply_cpu_patches": "cpu_support",
    "cpu_safe_forward_backward_func": "cpu_support",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
