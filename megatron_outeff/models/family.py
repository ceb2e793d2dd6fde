"""The model families: the one registry every dispatch point asks which family a model belongs to.

A family is a decoder architecture with its megatron-core builder and its Hugging Face weight
mapping (``FAMILIES``: ``opt``, ``llama``). Callers never branch on the family's name; they look the
family up and call what its modules offer, the same functions for every family:

    arch module (``family.arch``, e.g. models/opt.py, models/llama.py)
        ArchConfig, load_arch_config(name_or_path), load_parallel_hint(name_or_path), available_sizes(),
        check_parallel_layout(arch, tp, pp),
        transformer_config(arch, variant=None, **overrides), build_model(arch, variant=None, **kw),
        TRANSFORMER_FIELDS_FROM_ARCH ({megatron TransformerConfig field: the arch field setting it or None}),
        TRANSFORMER_FIELDS_UNSUPPORTED ({TransformerConfig field: why model.transformer_overrides refuses it})
        block_spec(config, arch, variant, seq_length), construct_model(config, spec, arch, **kw) (the hooks of
        models.common.build_family_model, which build_model is)
    Hugging Face mapping (``family.hf``, e.g. models/hf_opt.py, models/hf_llama.py)
        HF_LAYER_PREFIX ('model.decoder.layers.' / 'model.layers.'), VOCAB_PARALLEL (see below),
        variant_hf_shapes(arch, variant) (the variant's tensors, ops.variants.variant_tensors, by HF name),
        arch_from_hf_config(cfg), hf_config_dict(arch), hf_expected_shapes(arch), validate_hf_state_dict(sd, arch),
        split_variant_state(sd), check_same_architecture(got, expected, what),
        hf_state_dict_to_megatron(sd, arch, tp_rank, tp, pp_rank, pp, *, vocab_size, variant),
        megatron_to_hf_state_dict(rank_state_dicts, arch, *, strict, variant)
        megatron_rank_state_dict(rank) (hf_opt.hf_to_megatron's hook, which hf_state_dict_to_megatron is)

``VOCAB_PARALLEL``: {megatron key of a vocabulary-parallel tensor: the megatron key whose full padded
tensor it is cut from}; the LM head of a tied family (OPT) is cut from the word embedding.

Which family:
    family_of(arch)                 an ArchConfig instance (its ``family`` class attribute)
    family_for_arch(name_or_path)   a size name ('125m', 'opt-125m', 'llama-tiny') or a model YAML (its
                                    top-level ``family:`` key; OPT when absent)
    family_for_hf_model_type(t)     a Hugging Face config.json model_type: plain ('opt', 'llama') or our
                                    remote code ('outeff_opt', 'outeff_llama')
    family_for_manifest(m)          a checkpoint manifest (its ``family`` field; OPT for manifests written
                                    before the field existed)

Imports nothing heavy (no megatron, no transformers): megatron-free code (the Hugging Face exporter,
the evaluation tools) may import it. Errors: one-line ``OutEffError``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Mapping, Union

from megatron_outeff.errors import OutEffError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "model"  # the shipped model YAMLs (models/model_yaml.py)


@dataclass(frozen=True)
class HFComponents:
    """Module paths inside one Hugging Face decoder layer (and the model) that the outlier metrics hook,
    by the metrics' component kinds (megatron_outeff/metrics/outliers.py COMPONENT_KINDS)."""

    layers: str  # the decoder layers' ModuleList, from the CausalLM root
    attn_ln: str  # the norm before attention (after it for post-LN layers)
    attn_out: str  # the attention output projection
    ffn_ln: str  # the norm before the FFN
    fc2: str  # the FFN output projection
    final_ln: str  # the decoder's final norm, from the root ('' if none)
    embeddings: tuple = ()  # (name, path from the root) of the modules whose outputs sum to the first layer's input


@dataclass(frozen=True)
class ModelFamily:
    """One family: where its code lives and its Hugging Face names (no code runs at registration)."""

    name: str
    label: str  # how people write it ("OPT", "Llama")
    arch_module: str
    hf_module: str
    hf_model_type: str  # transformers' model_type of the plain (vanilla) export
    remote_model_type: str  # the model_type of our remote-code export (every other variant)
    hf_plain_config: str  # "module:Class" of transformers' config and CausalLM classes
    hf_plain_model: str
    hf_remote_config: str  # "module:Class" of our remote-code config and CausalLM classes
    hf_remote_model: str
    hf_components: HFComponents

    @property
    def arch(self) -> ModuleType:
        """The architecture module (megatron-core builder); imported on first use."""
        return importlib.import_module(self.arch_module)

    @property
    def hf(self) -> ModuleType:
        """The Hugging Face <-> megatron weight mapping module; imported on first use."""
        return importlib.import_module(self.hf_module)

    def hf_classes(self, plain: bool) -> tuple[type, type]:
        """(config class, CausalLM class) of the plain export (transformers' own) or of our remote code."""
        pair = (self.hf_plain_config, self.hf_plain_model) if plain else (self.hf_remote_config, self.hf_remote_model)
        return tuple(_load(path) for path in pair)


def _load(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _family(name: str, label: str, hf_components: HFComponents) -> ModelFamily:
    """A family laid out by the package's convention: models/<name>.py and models/hf_<name>.py; transformers'
    <label>Config / <label>ForCausalLM (model_type <name>); our remote code hf/configuration_outeff_<name>.py
    (OutEff<label>Config) and hf/modeling_outeff_<name>.py (OutEff<label>ForCausalLM), model_type outeff_<name>."""
    return ModelFamily(
        name=name,
        label=label,
        arch_module=f"megatron_outeff.models.{name}",
        hf_module=f"megatron_outeff.models.hf_{name}",
        hf_model_type=name,
        remote_model_type=f"outeff_{name}",
        hf_plain_config=f"transformers:{label}Config",
        hf_plain_model=f"transformers:{label}ForCausalLM",
        hf_remote_config=f"megatron_outeff.hf.configuration_outeff_{name}:OutEff{label}Config",
        hf_remote_model=f"megatron_outeff.hf.modeling_outeff_{name}:OutEff{label}ForCausalLM",
        hf_components=hf_components,
    )


FAMILIES: dict[str, ModelFamily] = {
    "opt": _family(
        "opt",
        "OPT",
        HFComponents(
            layers="model.decoder.layers",
            attn_ln="self_attn_layer_norm",
            attn_out="self_attn.out_proj",
            ffn_ln="final_layer_norm",
            fc2="fc2",
            final_ln="model.decoder.final_layer_norm",
            embeddings=(
                ("embed_tokens", "model.decoder.embed_tokens"),
                ("embed_positions", "model.decoder.embed_positions"),
            ),
        ),
    ),
    "llama": _family(
        "llama",
        "Llama",
        HFComponents(
            layers="model.layers",
            attn_ln="input_layernorm",
            attn_out="self_attn.o_proj",
            ffn_ln="post_attention_layernorm",
            fc2="mlp.down_proj",
            final_ln="model.norm",
            embeddings=(("embed_tokens", "model.embed_tokens"),),
        ),  # RoPE: no position table
    ),
}
DEFAULT_FAMILY = "opt"  # a size name without a family prefix, a model YAML without `family:`, an old manifest


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise OutEffError(f"model family {name!r}: expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of(arch) -> ModelFamily:
    """The family of an architecture config instance (its class attribute ``family``)."""
    name = getattr(arch, "family", None)
    if name is None:
        raise OutEffError(f"{type(arch).__name__}: not an architecture config of any model family")
    return get_family(name)


def family_for_arch(name_or_path: Union[str, Path, object]) -> ModelFamily:
    """The family of a model.arch value: an ArchConfig, a size name ('tiny', '125m', 'opt-1.3b',
    'llama-tiny', 'llama-3-8b': the prefix before the first '-' when it names a family, else OPT), or
    the path of a model YAML (its top-level ``family:`` key, OPT when absent)."""
    if not isinstance(name_or_path, (str, Path)):
        return family_of(name_or_path)
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        return get_family(yaml_family(p))
    prefix = str(name_or_path).lower().split("-", 1)[0]
    return FAMILIES.get(prefix, FAMILIES[DEFAULT_FAMILY])


def yaml_family(path: Path) -> str:
    """The ``family:`` of a model YAML (OPT when absent), read by the project's one YAML loader (duplicate keys
    refused; models/model_yaml.py reads the rest of the file); one-line error if missing or unreadable."""
    from megatron_outeff.utils.yaml_loader import load_yaml_file

    if not path.is_file():
        raise OutEffError(f"model config {str(path)!r}: no such file")
    doc = load_yaml_file(path)
    name = doc.get("family", DEFAULT_FAMILY) if isinstance(doc, dict) else DEFAULT_FAMILY
    if name not in FAMILIES:
        raise OutEffError(f"{path}: family={name!r}: expected one of {sorted(FAMILIES)}")
    return name


def family_for_hf_model_type(model_type) -> ModelFamily:
    """The family of a Hugging Face config.json ``model_type`` (plain or our remote code)."""
    for fam in FAMILIES.values():
        if model_type in (fam.hf_model_type, fam.remote_model_type):
            return fam
    known = sorted(t for f in FAMILIES.values() for t in (f.hf_model_type, f.remote_model_type))
    raise OutEffError(f"config.json model_type={model_type!r}: expected one of {known}")


def family_for_manifest(manifest: Mapping) -> ModelFamily:
    """The family of a checkpoint manifest (``family``; absent in manifests of OPT-only releases)."""
    return get_family(manifest.get("family", DEFAULT_FAMILY))


def available_archs() -> list[str]:
    """Every shipped size name, with its family prefix (configs/model/<family>-<size>.yaml)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem.split("-", 1)[0] in FAMILIES)


__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "HFComponents",
    "ModelFamily",
    "available_archs",
    "family_for_arch",
    "family_for_hf_model_type",
    "family_for_manifest",
    "family_of",
    "get_family",
    "yaml_family",
]
