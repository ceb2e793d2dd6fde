"""Hugging Face side: OPT and Llama with outlier-efficient attention as transformers remote code, the exporter
of a Hugging Face directory from OPT weights, and perplexity. Knows nothing of Megatron or DeepSpeed.

Public API:
    OutEffOPTConfig, OutEffOPTForCausalLM                       (configuration_/modeling_outeff_opt)
    OutEffLlamaConfig, OutEffLlamaForCausalLM                   (configuration_/modeling_outeff_llama)
    export_hf_dir(out_dir, hf_opt_state_dict, opt_config_kwargs, variant, *, seq_length=None, extra_state=None,
                  tokenizer_dir=None, dtype=None, calibration_batches=None) -> Path
    resolve_variant(variant, seq_length=None), fp16_overflow_report(state_dict), fp16_overflow_check(model, batches)
    perplexity(model, blocks=None, *, text=None, tokenizer=None, block_size=None, batch_size=8,
               device=None, add_special_tokens=False) -> {"loss", "ppl", "tokens"}
"""

from .configuration_outeff_llama import OutEffLlamaConfig
from .configuration_outeff_opt import OutEffOPTConfig
from .export import export_hf_dir, fp16_overflow_check, fp16_overflow_report, resolve_variant
from .modeling_outeff_llama import OutEffLlamaForCausalLM
from .modeling_outeff_opt import QUANT_POINTS_PER_LAYER, OutEffOPTForCausalLM
from .perplexity import perplexity, tokenize_blocks

__all__ = [
    "OutEffLlamaConfig",
    "OutEffLlamaForCausalLM",
    "OutEffOPTConfig",
    "OutEffOPTForCausalLM",
    "QUANT_POINTS_PER_LAYER",
    "export_hf_dir",
    "fp16_overflow_check",
    "fp16_overflow_report",
    "perplexity",
    "resolve_variant",
    "tokenize_blocks",
]
