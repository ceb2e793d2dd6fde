"""Model families built on megatron-core and their Hugging Face weight mappings.

Families (``models.family``: the one registry; training, the converter, the checkpoint format, the
Hugging Face export and the evaluation tools look a family up there instead of branching on names):
    opt     models.opt, models.opt_layers, models.hf_opt        configs/model/opt-<size>.yaml
    llama   models.llama, models.hf_llama                       configs/model/llama-<size>.yaml (family: llama)
Every family's modules offer the same names (``models/family.py`` docstring: ArchConfig, load_arch_config,
build_model, transformer_config, check_parallel_layout, ...; hf_state_dict_to_megatron,
megatron_to_hf_state_dict, arch_from_hf_config, hf_config_dict, ...). Adding a family: its two modules,
its configs/model/<family>-*.yaml, its Hugging Face remote code (megatron_outeff/hf) and one
``FAMILIES`` entry.

Public API (import the submodules; ``import megatron.core`` costs seconds, so nothing is imported here):
models.family
    FAMILIES, get_family(name), family_of(arch), family_for_arch(name_or_path), family_for_hf_model_type(t),
    family_for_manifest(manifest), available_archs()

models.model_yaml (every family's model YAML: configs/model/<family>-<size>.yaml or a path)
    ParallelHint, shipped_sizes(family), resolve(name_or_path, family), read(name_or_path, family) -> (path, doc),
    load_arch(ArchConfig, name_or_path), load_parallel_hint(ArchConfig, name_or_path, check_layout)
models.common (what the families' builders share)
    padded_vocab_size(vocab_size, tp_size), ArchConfigBase, build_family_model(arch, variant, **options), ...
models.opt
    OPTArchConfig, load_arch_config(name_or_path), load_parallel_hint(name_or_path), available_sizes()
    opt_transformer_config(arch, variant=None, **overrides) -> TransformerConfig
    build_opt_model(arch, variant=None, *, vocab_size=None, params_dtype=torch.float32,
                    sequence_parallel=False, pre_process=None, post_process=None, seq_length=None,
                    **transformer_overrides) -> OPTGPTModel (a megatron-core GPTModel)
    OPT_POSITION_OFFSET
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
models.llama
    LlamaArchConfig, load_arch_config(name_or_path), load_parallel_hint(name_or_path), available_sizes()
    llama_transformer_config(arch, variant=None, **overrides) -> TransformerConfig
    build_llama_model(arch, variant=None, *, vocab_size=None, params_dtype=torch.float32, sequence_parallel=False,
                      pre_process=None, post_process=None, seq_length=None, **transformer_overrides) -> GPTModel
models.hf_llama
    arch_from_hf_config(cfg), hf_config_dict(arch), load_hf_llama_dir(path), load_hf_llama_into_model(model, hf, arch)
    hf_state_dict_to_megatron(hf_sd, arch, tp_rank, tp_size, pp_rank, pp_size, *, vocab_size=None, variant=None)
    megatron_to_hf_state_dict(rank_state_dicts, arch, *, strict=True, variant=None)
    llama_variant_tensors(arch, variant), variant_hf_shapes(arch, variant) (ops.variants.variant_tensors for Llama)
    fuse_qkv / unfuse_qkv (grouped-query layout, the elementwise gate's rows)
"""
