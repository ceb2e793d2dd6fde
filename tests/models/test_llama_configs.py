"""The Llama family's architectures (configs/model/llama-*.yaml), the family registry and the Hugging Face
config translation: published shapes against published parameter counts and transformers' own model,
bad input as one-line errors. No megatron model is built here (fast)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from hf_testlib import LLAMA31_ROPE_SCALING, TINY_LLAMA

from megatron_outeff.errors import OutEffError
from megatron_outeff.models import family as fam
from megatron_outeff.models.hf_llama import arch_from_hf_config, hf_config_dict
from megatron_outeff.models.llama import available_sizes, check_parallel_layout, load_arch_config, load_parallel_hint

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "train" / "demo-tiny.yaml"
# Published parameter counts (model cards / the transformers models of the published config.json files).
PUBLISHED = {"2-7b": 6_738_415_616, "3-8b": 8_030_261_248, "3.1-8b": 8_030_261_248, "1.1b": 1_100_048_384}


def test_every_size_loads_with_a_valid_layout_hint():
    assert {"tiny", "125m", "1.1b", "2-7b", "3-8b", "3.1-8b"} <= set(available_sizes())
    for size in available_sizes():
        arch = load_arch_config(size)
        assert arch.name == f"llama-{size}" and load_arch_config(f"llama-{size}") == arch
        load_parallel_hint(size)


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_published_shapes_have_the_published_parameter_count(size):
    """Two oracles: the published count, and transformers' LlamaForCausalLM built (on the meta device)
    from our translation of the architecture into a LlamaConfig."""
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = load_arch_config(size)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**hf_config_dict(arch)))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[size] == arch.num_parameters()


def test_the_125m_class_size_is_about_125m():
    assert 1.2e8 < load_arch_config("125m").num_parameters() < 1.3e8


@pytest.mark.parametrize("size", ["tiny", "125m", "1.1b", "2-7b", "3-8b", "3.1-8b"])
def test_hf_config_round_trip(size):
    arch = load_arch_config(size)
    from transformers import LlamaConfig

    cfg = LlamaConfig(**hf_config_dict(arch)).to_dict()
    back = arch_from_hf_config(json.loads(json.dumps(cfg)), name=arch.name)
    assert back == arch.__class__(**{**arch.to_dict(), "hidden_dropout": 0.0})


def test_old_style_rope_keys_are_read():
    """config.json files written before transformers 5 say rope_theta / rope_scaling at the top level."""
    shape = {k: v for k, v in TINY_LLAMA.items() if k != "rope_parameters"}  # the tiny Llama, RoPE spelt as before
    scaling = dict(LLAMA31_ROPE_SCALING)
    cfg = dict(shape, model_type="llama", rope_theta=500000.0, max_position_embeddings=16384, rope_scaling=scaling)
    arch = arch_from_hf_config(cfg)
    assert (arch.rope_theta, arch.rope_scaling_factor, arch.num_query_groups) == (500000.0, 8.0, 2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tie_word_embeddings": True}, "tie_word_embeddings=True: expected False"),
        ({"attention_bias": True}, "attention_bias=True: expected False"),
        ({"mlp_bias": True}, "mlp_bias=True: expected False"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu': expected 'silu'"),
        ({"head_dim": 32}, "head_dim=32: expected 16"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope_type='yarn'"),
        (
            {"rope_parameters": {**LLAMA31_ROPE_SCALING, "rope_theta": 1e4, "low_freq_factor": 2.0}},
            "low_freq_factor=2.0: megatron-core's llama3 RoPE scaling fixes it at 1.0",
        ),
        ({"model_type": "mistral"}, "model_type='mistral': expected 'llama'"),
    ],
)
def test_unsupported_hf_configs_are_one_line_errors(change, message):
    cfg = {**hf_config_dict(load_arch_config("tiny")), "model_type": "llama", **change}
    with pytest.raises(OutEffError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        arch_from_hf_config(cfg)
    assert "\n" not in str(e.value)


def test_the_registry_resolves_every_spelling(tmp_path):
    assert fam.family_for_arch("tiny").name == "opt" and fam.family_for_arch("opt-125m").name == "opt"
    assert fam.family_for_arch("llama-tiny").name == "llama" and fam.family_for_arch("llama-3-8b").name == "llama"
    assert fam.family_for_arch(load_arch_config("tiny")).name == "llama"
    assert fam.family_for_arch(str(fam.CONFIG_DIR / "llama-125m.yaml")).name == "llama"
    assert fam.family_for_arch(str(fam.CONFIG_DIR / "opt-125m.yaml")).name == "opt"
    assert (
        fam.family_for_hf_model_type("outeff_llama").name == "llama"
        and fam.family_for_hf_model_type("opt").name == "opt"
    )
    assert fam.family_for_manifest({}).name == "opt" and fam.family_for_manifest({"family": "llama"}).name == "llama"
    assert {"llama-tiny", "llama-3-8b", "opt-125m", "opt-tiny"} <= set(fam.available_archs())
    own = tmp_path / "mine.yaml"
    own.write_text((fam.CONFIG_DIR / "llama-tiny.yaml").read_text().replace("name: llama-tiny", "name: mine"))
    assert fam.get_family("llama").arch.load_arch_config(own).name == "mine"
    twice = tmp_path / "twice.yaml"
    twice.write_text("family: llama\nfamily: opt\n" + (fam.CONFIG_DIR / "opt-tiny.yaml").read_text())
    for bad, message in (
        (lambda: fam.family_for_hf_model_type("gpt2"), "model_type='gpt2': expected one of"),
        (lambda: fam.get_family("gpt"), "model family 'gpt'"),
        (lambda: load_arch_config("llama-999b"), "unknown Llama size; expected one of"),
        (lambda: load_arch_config(fam.CONFIG_DIR / "opt-125m.yaml"), "family=None, expected 'llama'"),
        # The registry reads a YAML's family with the project's one loader: a second `family:` is refused
        # (PyYAML alone keeps the last one, so this file would have been taken for an OPT).
        (lambda: fam.family_for_arch(twice), "twice.yaml:2: duplicate key 'family' \\(first at line 1\\)"),
    ):
        with pytest.raises(OutEffError, match=message) as e:
            bad()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "tp, pp, message",
    [
        (4, 1, "num_query_groups=2 is not divisible by tensor parallel size 4"),
        (3, 1, "num_attention_heads=4 is not divisible by tensor parallel size 3"),
        (1, 3, "num_layers=2 is not divisible by pipeline parallel size 3"),
    ],
)
def test_layouts_the_model_cannot_divide(tp, pp, message):
    with pytest.raises(OutEffError, match=message):
        check_parallel_layout(load_arch_config("tiny"), tp, pp)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.arch_overrides={num_query_groups: 3}"],
            "num_attention_heads=4 is not divisible by num_query_groups=3",
        ),
        (["model.arch_overrides={activation: relu}"], "unknown config key 'model.arch_overrides.activation'"),
        (["model.transformer_overrides={num_query_groups: 1}"], "use model.arch_overrides.num_query_groups"),
        (["model.transformer_overrides={normalization: LayerNorm}"], "normalization: fixed by the Llama architecture"),
        (
            ["model.transformer_overrides={rotary_interleaved: true}"],
            "rotary_interleaved: fixed by the Llama architecture",
        ),
        (
            ["parallel.tensor_parallel=4", "parallel.global_batch_size=8"],
            "num_query_groups=2 is not divisible by tensor parallel size 4",
        ),
        (["model.arch=llama-huge"], "model.arch='llama-huge': model config 'llama-huge': unknown Llama size"),
    ],
)
def test_training_config_refusals_name_the_key(overrides, message):
    from megatron_outeff.training.config import load_config

    with pytest.raises(OutEffError, match=message.replace("(", r"\(")) as e:
        load_config(DEMO, ["model.arch=llama-tiny"] + overrides)
    assert "\n" not in str(e.value)


def test_shipped_llama_training_configs_load():
    from megatron_outeff.training.config import load_config

    for name in ("llama-tiny.yaml", "llama-125m.yaml", "demo-shakespeare-llama.yaml"):
        cfg = load_config(ROOT / "configs" / "train" / name)
        assert cfg.model.arch.startswith("llama-"), name
