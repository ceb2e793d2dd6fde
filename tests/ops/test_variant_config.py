"""AttentionVariantConfig (megatron_outeff/ops/variants.py): parsing, validation, legacy names, clip pairs."""

import json

import pytest

from megatron_outeff.ops.variants import GATE_VARIANTS, SOFTMAX_VARIANTS
from megatron_outeff.ops.variants import AttentionVariantConfig as V


def test_defaults_and_roundtrip():
    v = V()
    assert (v.softmax, v.gate, v.clip_pair(), v.gated, v.clipped) == ("vanilla", "none", None, False, False)
    w = V(softmax="softmax_n", softmax_n=2.0, clip_gamma=-0.1, clip_zeta=1.1, gate="mlp", gate_init_prob=0.5)
    assert V.from_dict(w.to_dict()) == w
    assert V.from_dict(None) == V()
    # the dict form is the JSON of a manifest / config.json: it survives a JSON round trip
    assert V.from_dict(json.loads(json.dumps(w.to_dict()))) == w


def test_choices_are_the_literal_types():
    assert SOFTMAX_VARIANTS == ("vanilla", "softmax1", "softmax_n", "learnable")
    assert GATE_VARIANTS == ("none", "linear", "mlp", "shared_linear", "elementwise")
    for s in SOFTMAX_VARIANTS:
        for g in GATE_VARIANTS:
            assert V.from_dict({"softmax": s, "gate": g}).to_dict()["softmax"] == s


def test_unknown_key_is_one_line_error():
    with pytest.raises(ValueError, match="'softmx'") as e:
        V.from_dict({"softmx": "softmax1"})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(softmax="softmax2"), "softmax='softmax2'"),
        (dict(gate="conv"), "gate='conv'"),
        (dict(clip_gamma=0.1), "gamma <= 0"),
        (dict(clip_gamma=-0.1, clip_zeta=0.9), "zeta >= 1"),
        (dict(clip_alpha=0.0), "alpha > 0"),
        (dict(clip_alpha=-3.0), "alpha > 0"),
        (dict(clip_alpha=12.0, clip_gamma=-0.1), "not both"),
        (dict(softmax_n=-1.0), "n >= 0"),
        (dict(gate_init_prob=0.0), r"\(0, 1\)"),
        (dict(gate_init_prob=1.0), r"\(0, 1\)"),
        (dict(softmax_n="abc"), "real number"),
        (dict(softmax_n=float("nan")), "finite"),
        (dict(gate_init_prob=True), "real number"),
    ],
)
def test_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle) as e:
        V(**kwargs)
    assert "\n" not in str(e.value)


def test_numbers_are_stored_as_floats():
    v = V(softmax="softmax_n", softmax_n=2, clip_alpha="12")
    assert (v.softmax_n, v.clip_alpha) == (2.0, 12.0)
    assert type(v.softmax_n) is float and type(v.clip_alpha) is float


def test_legacy_names_still_read():
    """Manifests written before the rename say "n"; Hugging Face configs wrote clip_zeta null without a clip."""
    assert V.from_dict({"softmax": "softmax_n", "n": 3.0}) == V(softmax="softmax_n", softmax_n=3.0)
    with pytest.raises(ValueError, match="'n' and 'softmax_n'"):
        V.from_dict({"n": 3.0, "softmax_n": 3.0})
    old_hf = {
        "model_type": "outeff_opt",
        "hidden_size": 64,
        "softmax": "softmax1",
        "softmax_n": 1.0,
        "clip_gamma": None,
        "clip_zeta": None,
        "gate": "linear",
        "gate_init_prob": 0.25,
    }
    assert V.from_fields(old_hf) == V(softmax="softmax1", gate="linear")
    assert "hidden_size" in old_hf and "softmax" in old_hf  # from_fields reads without pop
    V.from_fields(old_hf, pop=True)
    assert sorted(old_hf) == ["hidden_size", "model_type"]


def test_parse():
    assert V.parse("softmax1") == V(softmax="softmax1")
    assert V.parse('{"softmax": "learnable", "gate": "linear"}') == V(softmax="learnable", gate="linear")
    assert V.parse({"gate": "mlp"}) == V(gate="mlp") and V.parse(None) == V()
    w = V(softmax="softmax1")
    assert V.parse(w) is w
    with pytest.raises(ValueError, match="not a JSON object"):
        V.parse('{"softmax": ')
    with pytest.raises(ValueError, match="softmax='softmax7'"):
        V.parse("softmax7")


def test_plain_softmax():
    assert V().plain_softmax and V(softmax="softmax_n", softmax_n=0).plain_softmax
    assert not V(softmax="softmax1").plain_softmax
    assert not V(clip_gamma=-0.1).plain_softmax and not V(gate="linear").plain_softmax


def test_clip_pairs():
    assert V(clip_gamma=-0.03).clip_pair() == (-0.03, 1.0)
    a = V(clip_alpha=12.0)
    assert a.clip_pair(512) == (-12.0 / 512, 1.0)
    assert a.resolved(512) == V(clip_gamma=-12.0 / 512)
    with pytest.raises(ValueError, match="sequence length"):
        a.clip_pair()
    assert "clipped" in V(softmax="softmax1", clip_gamma=-0.03).describe()
