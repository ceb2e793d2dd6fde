"""Each variant owns its tensors: the one description (``ops.variants.variant_tensors``: name, shape, initial
value, megatron and Hugging Face names, TP split, weight decay) against every place that holds or moves them:
megatron's layer, the optimizer's parameter roles, the Hugging Face remote code, the converter's mapping and its
``from-hf`` initialisation. Every softmax x gate combination of the vocabulary."""

import itertools

import pytest
import torch
from megatron_testlib import gpt, tiny_config

from megatron_outeff.ops.variants import GATE_VARIANTS, SOFTMAX_VARIANTS, AttentionVariantConfig, variant_tensors

COMBINATIONS = list(itertools.product(SOFTMAX_VARIANTS, GATE_VARIANTS))
H, D, LAYERS = 4, 16, 2
STD = 0.02
TINY_HF = dict(
    vocab_size=128,
    hidden_size=H * D,
    num_hidden_layers=LAYERS,
    ffn_dim=128,
    num_attention_heads=H,
    max_position_embeddings=32,
    init_std=STD,
)


pytestmark = pytest.mark.usefixtures("model_parallel")


def described(variant):
    return variant_tensors(variant, num_heads=H, head_dim=D, hidden_size=H * D)


def megatron_model(variant):
    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec

    config = tiny_config(variant, num_layers=LAYERS, hidden_size=H * D, num_attention_heads=H, init_method_std=STD)
    return gpt(config, get_outeff_layer_spec(variant), max_sequence_length=32)


def assert_initialised_as_described(t, value: torch.Tensor, where: str):
    if t.init is None:  # drawn by the weight init: N(0, STD), not a constant
        assert value.std() > STD / 4 and value.abs().max() < 10 * STD, (where, t)
    else:
        assert torch.equal(value, torch.full_like(value, t.init)), (where, t)


@pytest.mark.parametrize("softmax,gate", COMBINATIONS)
def test_megatron_layer_holds_exactly_the_described_tensors(softmax, gate):
    """Per layer: the parameters carrying a description are exactly the described ones, under their megatron
    names, with their shapes (TP=1: the full shape), initial values and the optimizer role their ``decay`` says;
    a tensor fused into linear_qkv is its rows there (per head: q, gate, k, v)."""
    from megatron_outeff.training.optimizer import decay_role

    variant = AttentionVariantConfig(softmax=softmax, gate=gate)
    tensors = described(variant)
    model = megatron_model(variant)
    modules = dict(model.named_modules())
    for i in range(LAYERS):
        prefix = f"decoder.layers.{i}.self_attention."
        found = {
            n[len(prefix) :]: p
            for n, p in model.named_parameters()
            if n.startswith(prefix) and getattr(p, "variant_tensor", None) is not None
        }
        assert sorted(found) == sorted(t.megatron for t in tensors if not t.fused_qkv)
        params = dict(model.named_parameters())
        for t in tensors:
            if t.fused_qkv:  # rows 1 of every 4 d-row blocks of the megatron tensor
                p = params[prefix + t.megatron]
                assert p.shape[0] == 4 * H * D and tuple(p.shape[1:]) == t.shape[1:]
                value = p.detach().reshape(H, 4, D, *p.shape[1:])[:, 1].reshape(t.shape)
            else:
                p = found[t.megatron]
                assert p.variant_tensor == t and tuple(p.shape) == t.shape
                value = p.detach()
            assert (p.tensor_model_parallel, p.partition_dim) == (True, t.tp_dim)
            assert_initialised_as_described(t, value, t.megatron)
            owner, _, local = (prefix + t.megatron).rpartition(".")
            role = decay_role(local, p, modules[owner])
            assert (role == "matrix") == t.decay, (t, role)


@pytest.mark.parametrize("softmax,gate", COMBINATIONS)
def test_hugging_face_model_holds_exactly_the_described_tensors(softmax, gate):
    """The remote-code model's tensors beyond plain OPT's are the described ones under their Hugging Face names,
    as the converter expects them (``variant_hf_shapes``), initialised by its own init as described."""
    from megatron_outeff.hf.configuration_outeff_opt import OutEffOPTConfig
    from megatron_outeff.hf.modeling_outeff_opt import OutEffOPTForCausalLM
    from megatron_outeff.models.hf_opt import arch_from_hf_config, hf_expected_shapes, variant_hf_shapes

    variant = AttentionVariantConfig(softmax=softmax, gate=gate)
    torch.manual_seed(0)
    model = OutEffOPTForCausalLM(OutEffOPTConfig(**TINY_HF, **variant.to_dict()))
    arch = arch_from_hf_config({"model_type": "opt", **TINY_HF})
    sd = model.state_dict()
    extra = {k: tuple(v.shape) for k, v in sd.items() if k not in hf_expected_shapes(arch) and k != "lm_head.weight"}
    assert extra == variant_hf_shapes(arch, variant)
    for i in range(LAYERS):
        for t in described(variant):
            assert_initialised_as_described(t, sd[f"model.decoder.layers.{i}.self_attn.{t.hf}"], t.hf)


@pytest.mark.parametrize("softmax,gate", COMBINATIONS)
def test_from_hf_initialises_as_training_does(softmax, gate):
    """A Hugging Face OPT lacking the variant's tensors gets them initialised as the description says (the
    values training from scratch starts with), and the mapping places them at the megatron names."""
    from megatron_outeff.convert.core import init_variant_tensors
    from megatron_outeff.models.hf_opt import arch_from_hf_config, hf_expected_shapes, hf_state_dict_to_megatron

    variant = AttentionVariantConfig(softmax=softmax, gate=gate)
    arch = arch_from_hf_config({"model_type": "opt", **TINY_HF})
    extras = init_variant_tensors(arch, variant, seed=3)
    full = {**{k: torch.zeros(s) for k, s in hf_expected_shapes(arch).items()}, **extras}
    sd = hf_state_dict_to_megatron(full, arch, variant=variant)
    for i in range(LAYERS):
        for t in described(variant):
            value = extras[f"model.decoder.layers.{i}.self_attn.{t.hf}"]
            assert_initialised_as_described(t, value, t.hf)
            mine = sd[f"decoder.layers.{i}.self_attention.{t.megatron}"]
            if t.fused_qkv:  # per head: q, gate, k, v
                mine = mine.reshape(H, 4, D, *mine.shape[1:])[:, 1].reshape(t.shape)
            assert torch.equal(mine, value)


def test_the_learnable_offset_starts_at_zero_everywhere():
    """One initial value: training from scratch, Hugging Face's own init and from-hf all start at 0."""
    (t,) = described(AttentionVariantConfig(softmax="learnable"))
    assert t.init == 0.0
    model = megatron_model(AttentionVariantConfig(softmax="learnable"))
    assert torch.equal(model.decoder.layers[0].self_attention.core_attention.softmax_offset.detach(), torch.zeros(H))


def test_unknown_names_are_one_line_errors():
    from megatron_outeff.ops.variants import find_variant_tensor

    tensors = described(AttentionVariantConfig(softmax="learnable", gate="mlp"))
    assert find_variant_tensor(tensors, "hf", "gate.fc2_bias").megatron == "head_gate.bias"
    with pytest.raises(ValueError, match="'gate.fc3_bias': not a tensor of this attention variant") as e:
        find_variant_tensor(tensors, "hf", "gate.fc3_bias")
    assert "\n" not in str(e.value)
