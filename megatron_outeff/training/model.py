"""Build this rank's megatron-core GPT model (its TP shard / PP stage) from the typed config.

``build_model(cfg)`` is the single place the training code gets a model from. It uses the OPT
builder (megatron_outeff.models.opt) when present, with the attention variant of ``cfg.attention``.
"""
from __future__ import annotations

import torch

from .config import Config, ConfigError

# Megatron fusions are CUDA-only kernels: always off on CPU, left to the builder's defaults on GPU.
_CPU_SAFE = dict(
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    persist_layer_norm=False,
    bias_dropout_fusion=False,
    gradient_accumulation_fusion=False,
    apply_rope_fusion=False,
)


def _transformer_overrides(cfg: Config) -> dict:
    over = dict(cfg.model.overrides)
    if not torch.cuda.is_available():
        for k, v in _CPU_SAFE.items():
            over.setdefault(k, v)
    # Same initial weights for every TP layout (TP shards are exact slices of the full matrices).
    over.setdefault("use_cpu_initialization", True)
    over["fp16"] = cfg.precision.dtype == "fp16"
    over["bf16"] = cfg.precision.dtype == "bf16"
    if cfg.model.recompute_granularity:
        over["recompute_granularity"] = cfg.model.recompute_granularity
        if cfg.model.recompute_granularity == "full":
            over["recompute_method"] = cfg.model.recompute_method or "uniform"
            over["recompute_num_layers"] = cfg.model.recompute_num_layers or 1
    return over


def attention_variant(cfg: Config):
    """cfg.attention -> AttentionVariantConfig, or None for vanilla softmax."""
    if not cfg.attention:
        return None
    try:
        from megatron_outeff.megatron.variant import AttentionVariantConfig
    except ImportError:
        raise ConfigError("config section 'attention' needs megatron_outeff.megatron.variant (not available)") from None
    try:
        return AttentionVariantConfig.from_dict(dict(cfg.attention))
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"attention: {e}") from None


def build_model(cfg: Config, *, pre_process: bool, post_process: bool) -> torch.nn.Module:
    over = _transformer_overrides(cfg)
    variant = attention_variant(cfg)
    try:
        from megatron_outeff.models.opt import build_opt_model, load_arch_config
    except ImportError:
        build_opt_model = None
    if build_opt_model is not None:
        arch = load_arch_config(cfg.model.arch)
        if cfg.data.seq_length > arch.max_position_embeddings:
            raise ConfigError(
                f"data.seq_length={cfg.data.seq_length} exceeds the arch's max positions {arch.max_position_embeddings}"
            )
        model = build_opt_model(
            arch, variant, vocab_size=cfg.model.vocab_size, sequence_parallel=cfg.parallel.sequence_parallel,
            pre_process=pre_process, post_process=post_process, **over,
        )
    else:
        if variant is not None:
            raise ConfigError("attention variants need megatron_outeff.models.opt (not available)")
        model = _fallback_gpt(cfg, over, pre_process, post_process)
    if cfg.precision.dtype in ("fp16", "bf16"):
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)  # casts params and the first stage's inputs
    return model


_FALLBACK_ARCHS = {
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, vocab=256, max_pos=128),
    "125m": dict(num_layers=12, hidden_size=768, num_attention_heads=12, ffn_hidden_size=3072, vocab=50272, max_pos=512),
}


def _fallback_gpt(cfg: Config, over: dict, pre_process: bool, post_process: bool):
    """A plain OPT-shaped megatron GPTModel (used until the OPT builder is available)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    if cfg.model.arch not in _FALLBACK_ARCHS:
        raise ConfigError(f"model.arch={cfg.model.arch!r}: expected one of {sorted(_FALLBACK_ARCHS)}")
    if cfg.parallel.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel needs the OPT builder (megatron_outeff.models.opt)")
    a = dict(_FALLBACK_ARCHS[cfg.model.arch])
    vocab, max_pos = a.pop("vocab"), a.pop("max_pos")
    tc = dict(a, activation_func=F.relu, init_method_std=0.006, hidden_dropout=0.1, attention_dropout=0.0,
              add_bias_linear=True, normalization="LayerNorm", layernorm_epsilon=1e-5,
              tensor_model_parallel_size=cfg.parallel.tensor_parallel,
              pipeline_model_parallel_size=cfg.parallel.pipeline_parallel,
              params_dtype=torch.float32, pipeline_dtype=torch.float32)
    tc.update(over)
    if cfg.precision.dtype != "fp32":
        tc["pipeline_dtype"] = torch.float16 if cfg.precision.dtype == "fp16" else torch.bfloat16
    config = TransformerConfig(**tc)
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=cfg.model.vocab_size or vocab,
        max_sequence_length=max(max_pos, cfg.data.seq_length), pre_process=pre_process, post_process=post_process,
        position_embedding_type="learned_absolute", share_embeddings_and_output_weights=True,
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The megatron GPTModel inside DeepSpeed / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
