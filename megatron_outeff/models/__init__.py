"""Model families built on megatron-core and their Hugging Face weight mappings.

Public API (import the submodules; ``import megatron.core`` costs seconds, so nothing is imported here):

models.opt
    OPTArchConfig, load_arch_config(name_or_path), load_parallel_hint(name_or_path), available_sizes()
    opt_transformer_config(arch, variant=None, **overrides) -> TransformerConfig
    build_opt_model(arch, variant=None, *, vocab_size=None, params_dtype=torch.float32,
                    sequence_parallel=False, pre_process=None, post_process=None, seq_length=None,
                    **transformer_overrides) -> OPTGPTModel (a megatron-core GPTModel)
    padded_vocab_size(vocab_size, tp_size), OPT_POSITION_OFFSET
models.opt_layers (imported by models.opt when needed; OPT-350m)
    OPTPostLNTransformerLayer + OPTPostLNLayerSubmodules, post_layernorm_layer_spec(layer_spec),
    OPTProjectedWordEmbedding (project_in), OPTProjectedOutputLayer (project_out)
models.hf_opt
    load_hf_opt_dir(path, expected_arch=None) -> (OPTArchConfig, hf_state_dict)
    save_hf_opt_dir(path, arch, hf_state_dict)
    hf_state_dict_to_megatron(hf_sd, arch, tp_rank, tp_size, pp_rank, pp_size, *, vocab_size=None)
    megatron_to_hf_state_dict(rank_state_dicts, arch, *, strict=True)
    gather_megatron_state_dicts(model), load_megatron_state_dict(model, sd, allow_missing=())
    load_hf_opt_into_model(model, hf_dir_or_sd, arch), megatron_model_to_hf_state_dict(model, arch)
"""
