"""The variant vocabulary (``ops.variants.SoftmaxType`` / ``GateType``) against every translator: a name added
to a Literal but not handled by one of them fails here, the assertion naming the place to extend (the ops
README's "Adding a variant" checklists list them).

Per-name tables (each must have exactly the vocabulary's names): the sink logit of each softmax
(``ops/variants.py SINK_LOGITS``), the family of each gate (``GATE_FAMILIES``), megatron-core's names
(``megatron/variant.py TO_MEGATRON_SOFTMAX / TO_MEGATRON_GATE``). Then every softmax x gate combination
through each translator: the tensor description, the math (sink, gate), the megatron translator, the training
config, the manifest and Hugging Face config.json forms, the converter's mapping, the Hugging Face remote code
(each model family's: OPT, Llama) and megatron's layer (built and run)."""

import json
from pathlib import Path

import pytest
import torch
from megatron_testlib import gpt, tiny_config

from megatron_outeff.ops.variants import (
    GATE_FAMILIES,
    GATE_VARIANTS,
    SINK_LOGITS,
    SOFTMAX_VARIANTS,
    AttentionVariantConfig,
    variant_tensors,
)

COMBINATIONS = [(s, g) for s in SOFTMAX_VARIANTS for g in GATE_VARIANTS]
DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "train" / "demo-tiny.yaml")
H, D = 4, 16
# The sizes both families' tiny Hugging Face models share (one layer, 4 query heads of 16).
TINY_SHAPE = dict(
    vocab_size=64, hidden_size=H * D, num_hidden_layers=1, num_attention_heads=H, max_position_embeddings=16
)
TINY_HF = dict(TINY_SHAPE, ffn_dim=64, dropout=0.0)
TINY_LLAMA = dict(TINY_SHAPE, intermediate_size=64, num_key_value_heads=H // 2)
pytestmark = pytest.mark.usefixtures("model_parallel")


def test_every_per_name_table_covers_the_vocabulary():
    from megatron_outeff.megatron.variant import TO_MEGATRON_GATE, TO_MEGATRON_SOFTMAX
    from megatron_outeff.ops.gate import HEAD_GATE_KINDS

    assert sorted(SINK_LOGITS) == sorted(SOFTMAX_VARIANTS), "ops/variants.py SINK_LOGITS: the sink of each softmax"
    assert sorted(GATE_FAMILIES) == sorted(GATE_VARIANTS), "ops/variants.py GATE_FAMILIES: the family of each gate"
    assert set(GATE_FAMILIES.values()) <= {None, "head", "elementwise"}, "a gate family megatron / HF cannot build"
    assert sorted(TO_MEGATRON_SOFTMAX) == sorted(SOFTMAX_VARIANTS), "megatron/variant.py TO_MEGATRON_SOFTMAX"
    assert sorted(TO_MEGATRON_GATE) == sorted(GATE_VARIANTS), "megatron/variant.py TO_MEGATRON_GATE"
    assert set(HEAD_GATE_KINDS) == {g for g, f in GATE_FAMILIES.items() if f == "head"}


def _variant(softmax, gate):
    return AttentionVariantConfig(softmax=softmax, gate=gate, softmax_n=2.0, clip_gamma=-0.02)


@pytest.mark.parametrize("softmax,gate", COMBINATIONS)
def test_the_ops_handle_every_name(softmax, gate):
    """The description, the sink and the gate's math: every impl on CPU runs the variant."""
    from megatron_outeff.ops import head_gate, outeff_attention
    from megatron_outeff.ops.gate import elementwise_gate

    variant = _variant(softmax, gate)
    tensors = {
        t.name: t.initial_tensor(0.1, torch.Generator().manual_seed(0))
        for t in variant_tensors(variant, num_heads=H, head_dim=D, hidden_size=H * D)
    }
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, H * D, generator=g)
    q, k, v = (torch.randn(2, 5, H, D, generator=g) for _ in range(3))
    family = GATE_FAMILIES[gate]
    gate_values = None
    if family == "head":
        gate_values = head_gate(x, gate, {n: t for n, t in tensors.items() if n != "softmax_offset"})
    elif family == "elementwise":
        logits = x @ tensors["weight"].T + tensors.get("bias", 0)
        gate_values = elementwise_gate(logits).view(2, 5, H, D)
    for impl in ("torch", "cpu"):
        out = outeff_attention(
            q,
            k,
            v,
            **variant.softmax_args(),
            offset=tensors.get("softmax_offset"),
            clip=variant.clip_pair(),
            gate=gate_values,
            causal=True,
            impl=impl,
        )
        assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("softmax,gate", COMBINATIONS)
def test_the_translators_handle_every_name(softmax, gate):
    """megatron's names, the training config, the manifest's and config.json's forms, the converter's mapping."""
    from megatron_outeff.hf.configuration_outeff_opt import OutEffOPTConfig
    from megatron_outeff.megatron.variant import (
        from_megatron_softmax_type,
        megatron_softmax_type,
        resolve_variant,
        transformer_config_fields,
        variant_from_megatron,
    )
    from megatron_outeff.models.hf_opt import (
        arch_from_hf_config,
        hf_expected_shapes,
        hf_state_dict_to_megatron,
        megatron_to_hf_state_dict,
        variant_hf_shapes,
    )
    from megatron_outeff.training.config import load_config

    variant = _variant(softmax, gate)
    # megatron-core: its config fields agree with the variant, and its own names round-trip
    fields = transformer_config_fields(variant)

    class Config:
        softmax_type = "vanilla"
        attention_output_gate = fields["attention_output_gate"]

    assert resolve_variant(Config(), variant) == variant
    theirs = megatron_softmax_type(variant.replace(clip_gamma=None))
    if theirs is not None:
        Config.softmax_type = theirs
        back = variant_from_megatron(Config())
        assert back.gate == gate and megatron_softmax_type(back) == theirs
        assert from_megatron_softmax_type(theirs, gate=gate).gate == gate
    # the training config's attention section, the manifest (JSON) and config.json (flat keys)
    cfg = load_config(DEMO, [f"attention={{softmax: {softmax}, gate: {gate}, softmax_n: 2.0, clip_gamma: -0.02}}"])
    assert cfg.attention == variant
    assert AttentionVariantConfig.from_dict(json.loads(json.dumps(variant.to_dict()))) == variant
    assert OutEffOPTConfig(**TINY_HF, **variant.to_dict()).attention_variant() == variant
    # the converter: Hugging Face -> megatron at TP=2 -> Hugging Face, exactly
    arch = arch_from_hf_config({"model_type": "opt", **TINY_HF})
    g = torch.Generator().manual_seed(0)
    hf = {
        k: torch.randn(s, generator=g)
        for k, s in {**hf_expected_shapes(arch), **variant_hf_shapes(arch, variant)}.items()
    }
    ranks = {(t, 0): hf_state_dict_to_megatron(hf, arch, t, 2, variant=variant) for t in range(2)}
    back = megatron_to_hf_state_dict(ranks, arch, variant=variant)
    assert all(torch.equal(back[k], hf[k]) for k in hf) and sorted(back) == sorted(list(hf) + ["lm_head.weight"])
    # the Llama family's mapping (grouped-query attention: 4 query heads on 2 key/value heads) and its config.json
    from megatron_outeff.hf.configuration_outeff_llama import OutEffLlamaConfig
    from megatron_outeff.models import hf_llama

    assert OutEffLlamaConfig(**TINY_LLAMA, **variant.to_dict()).attention_variant() == variant
    arch = hf_llama.arch_from_hf_config({"model_type": "llama", **TINY_LLAMA})
    shapes = {**hf_llama.hf_expected_shapes(arch), **hf_llama.variant_hf_shapes(arch, variant)}
    hf = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ranks = {(t, 0): hf_llama.hf_state_dict_to_megatron(hf, arch, t, 2, variant=variant) for t in range(2)}
    back = hf_llama.megatron_to_hf_state_dict(ranks, arch, variant=variant)
    assert sorted(back) == sorted(hf) and all(torch.equal(back[k], hf[k]) for k in hf)


@pytest.mark.parametrize("softmax,gate", COMBINATIONS)
def test_the_models_handle_every_name(softmax, gate):
    """megatron's layer (config from the translator) and the Hugging Face remote code build and run it."""
    from megatron_outeff.hf.configuration_outeff_opt import OutEffOPTConfig
    from megatron_outeff.hf.modeling_outeff_opt import OutEffOPTForCausalLM
    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec

    variant = _variant(softmax, gate)
    # megatron's default init (std 0.02): the weights' values do not matter here, only that it builds and runs
    config = tiny_config(variant, num_layers=1, ffn_hidden_size=64, init_method_std=0.02)
    model = gpt(config, get_outeff_layer_spec(variant), vocab_size=64)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    logits = model(ids, torch.arange(8).expand_as(ids), None)
    logits.float().sum().backward()
    assert torch.isfinite(logits).all()
    assert all(p.grad is not None for p in model.parameters() if getattr(p, "variant_tensor", None) is not None)
    hf = OutEffOPTForCausalLM(OutEffOPTConfig(**TINY_HF, **variant.to_dict())).eval()
    with torch.no_grad():
        assert torch.isfinite(hf(input_ids=ids).logits).all()
    from megatron_outeff.hf.configuration_outeff_llama import OutEffLlamaConfig
    from megatron_outeff.hf.modeling_outeff_llama import OutEffLlamaForCausalLM

    llama = OutEffLlamaForCausalLM(OutEffLlamaConfig(**TINY_LLAMA, **variant.to_dict())).eval()
    with torch.no_grad():
        assert torch.isfinite(llama(input_ids=ids).logits).all()
