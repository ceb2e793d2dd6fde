"""AttentionVariantConfig: parsing, validation, megatron mapping, clip pairs (no megatron import)."""
import pytest

from megatron_outeff.megatron.variant import AttentionVariantConfig as V


def test_defaults_and_roundtrip():
    v = V()
    assert (v.softmax, v.gate, v.clip_pair(), v.gated, v.clipped) == ("vanilla", "none", None, False, False)
    w = V(softmax="softmax_n", n=2.0, clip_gamma=-0.1, clip_zeta=1.1, gate="mlp", gate_init_prob=0.5)
    assert V.from_dict(w.to_dict()) == w
    assert V.from_dict(None) == V()


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
        (dict(n=-1.0), "n >= 0"),
        (dict(gate_init_prob=0.0), r"\(0, 1\)"),
        (dict(gate_init_prob=1.0), r"\(0, 1\)"),
        (dict(n="abc"), "real number"),
    ],
)
def test_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle) as e:
        V(**kwargs)
    assert "\n" not in str(e.value)


def test_megatron_mapping():
    assert V.from_megatron_softmax_type("vanilla").softmax == "vanilla"
    assert V.from_megatron_softmax_type("off-by-one").softmax == "softmax1"
    assert V.from_megatron_softmax_type("learnable").softmax == "learnable"
    with pytest.raises(ValueError, match="softmax_type='sigmoid'"):
        V.from_megatron_softmax_type("sigmoid")
    assert V(softmax="softmax1").megatron_softmax_type() == "off-by-one"
    assert V(softmax="softmax1", gate="linear").megatron_softmax_type() is None


def test_clip_pairs():
    assert V(clip_gamma=-0.03).clip_pair() == (-0.03, 1.0)
    a = V(clip_alpha=12.0)
    assert a.clip_pair(512) == (-12.0 / 512, 1.0)
    assert a.resolved(512) == V(clip_gamma=-12.0 / 512)
    with pytest.raises(ValueError, match="sequence length"):
        a.clip_pair()
    assert "clipped" in V(softmax="softmax1", clip_gamma=-0.03).describe()
