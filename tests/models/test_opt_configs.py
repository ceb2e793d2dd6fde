"""Model YAMLs -> OPTArchConfig; strictness and refusals (no megatron process groups needed)."""

import pytest
import yaml

from megatron_outeff.models.common import padded_vocab_size
from megatron_outeff.models.family import CONFIG_DIR
from megatron_outeff.models.opt import OPTArchConfig, available_sizes, load_arch_config, load_parallel_hint

# (layers, hidden, heads) from the OPT paper, Table 1.
PUBLISHED = {
    "125m": (12, 768, 12),
    "350m": (24, 1024, 16),
    "1.3b": (24, 2048, 32),
    "2.7b": (32, 2560, 32),
    "6.7b": (32, 4096, 32),
    "13b": (40, 5120, 40),
    "30b": (48, 7168, 56),
    "66b": (64, 9216, 72),
    "175b": (96, 12288, 96),
}


def test_every_size_has_a_yaml():
    assert set(available_sizes()) == set(PUBLISHED) | {"tiny"}


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_published_architectures(size):
    a = load_arch_config(size)
    assert (a.num_layers, a.hidden_size, a.num_attention_heads) == PUBLISHED[size]
    assert a.ffn_hidden_size == 4 * a.hidden_size
    assert (a.vocab_size, a.max_position_embeddings, a.layernorm_epsilon) == (50272, 2048, 1e-5)
    assert (a.activation, a.hidden_dropout, a.attention_dropout, a.init_method_std) == ("relu", 0.1, 0.0, 0.006)
    # Only OPT-350m projects a 512-wide embedding and normalises after the residual adds.
    assert (a.embed_dim, a.do_layer_norm_before) == ((512, False) if size == "350m" else (a.hidden_size, True))
    hint = load_parallel_hint(size)
    assert a.num_attention_heads % hint.tensor_parallel == 0
    assert a.num_layers % hint.pipeline_parallel == 0


def test_name_forms_and_paths():
    assert load_arch_config("opt-125m") == load_arch_config("125m") == load_arch_config(CONFIG_DIR / "opt-125m.yaml")
    tiny = load_arch_config("tiny")
    assert (tiny.num_layers, tiny.hidden_size, tiny.num_attention_heads, tiny.ffn_hidden_size) == (2, 64, 4, 256)


def test_opt_350m_yaml_and_bad_projection_values():
    a = load_arch_config("350m")
    assert (a.word_embed_proj_dim, a.embed_dim, a.hidden_size, a.do_layer_norm_before) == (512, 512, 1024, False)
    with pytest.raises(ValueError, match=r"word_embed_proj_dim=0: expected a positive integer or null"):
        OPTArchConfig(
            name="x", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, word_embed_proj_dim=0
        )
    with pytest.raises(ValueError, match=r"do_layer_norm_before='no': expected true or false"):
        OPTArchConfig(
            name="x",
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            ffn_hidden_size=256,
            do_layer_norm_before="no",
        )


def test_unknown_keys_are_errors(tmp_path):
    doc = yaml.safe_load((CONFIG_DIR / "opt-tiny.yaml").read_text())
    doc["arch"]["num_heads"] = 4
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_heads'\]"):
        load_arch_config(p)
    doc["arch"].pop("num_heads")
    doc["training"] = {}
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="unknown top-level key"):
        load_arch_config(p)
    doc.pop("training")
    doc["parallel"]["tp"] = 2
    p.write_text(yaml.safe_dump(doc))
    load_arch_config(p)  # the arch is fine; only the hint is wrong
    with pytest.raises(ValueError, match=r"parallel: unknown key"):
        load_parallel_hint(p)
    doc["parallel"] = {"tensor_parallel": 3}  # tiny has 4 heads
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="not divisible by tensor parallel size 3"):
        load_parallel_hint(p)
    # Values are checked before the layout (a 0 divided the heads by zero; 'two' raised a TypeError).
    for section, message in (
        ({"tensor_parallel": 0}, "parallel.tensor_parallel=0: expected a positive integer"),
        ({"pipeline_parallel": "two"}, "parallel.pipeline_parallel='two': expected a positive integer"),
        ({"zero_stage": 7}, "parallel.zero_stage=7: expected 0, 1, 2 or 3"),
        ({"tensor_parallel": True}, "parallel.tensor_parallel=True: expected a positive integer"),
        ([1, 2], "parallel: expected a mapping of ParallelHint fields, got list"),
    ):
        doc["parallel"] = section
        p.write_text(yaml.safe_dump(doc))
        with pytest.raises(ValueError) as e:
            load_parallel_hint(p)
        assert str(e.value).startswith(f"{p}: {message}"), str(e.value)


def test_bad_values_and_names():
    with pytest.raises(ValueError, match="unknown OPT size"):
        load_arch_config("7b")
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        OPTArchConfig(name="x", num_layers=2, hidden_size=64, num_attention_heads=5, ffn_hidden_size=256)
    with pytest.raises(ValueError, match="activation='silu'"):
        OPTArchConfig(
            name="x", num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=256, activation="silu"
        )
    with pytest.raises(ValueError, match="missing required"):
        OPTArchConfig.from_dict({"name": "x"})


def test_padded_vocab():
    assert padded_vocab_size(50272, 1) == padded_vocab_size(50272, 4) == 50272
    assert padded_vocab_size(50272, 8) == 50304
    assert padded_vocab_size(250, 2) == 256


def test_build_refuses_bad_tp():
    from megatron_outeff.models.opt import check_parallel_layout

    with pytest.raises(ValueError, match="num_attention_heads=40 is not divisible by tensor parallel size 16"):
        check_parallel_layout(load_arch_config("13b"), 16, 1)


def test_transformer_fields_from_arch():
    """TRANSFORMER_FIELDS_FROM_ARCH (what model.transformer_overrides refuses) names TransformerConfig fields,
    and each one mapped to an arch field carries that field's value in opt_transformer_config."""
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_outeff.models.opt import TRANSFORMER_FIELDS_FROM_ARCH, opt_transformer_config

    assert set(TRANSFORMER_FIELDS_FROM_ARCH) <= {f.name for f in dataclasses.fields(TransformerConfig)}
    arch = dataclasses.replace(
        load_arch_config("tiny"),
        hidden_dropout=0.25,
        attention_dropout=0.125,
        layernorm_epsilon=1e-6,
        init_method_std=0.02,
    )
    tc = opt_transformer_config(arch)
    plain = {
        k: v
        for k, v in TRANSFORMER_FIELDS_FROM_ARCH.items()
        if v and k not in ("activation_func", "output_layer_init_method")
    }
    assert {k: getattr(tc, k) for k in plain} == {k: getattr(arch, v) for k, v in plain.items()}
