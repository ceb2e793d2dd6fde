"""megatron <-> Hugging Face mapping of the attention-variant tensors (models/hf_opt.py), any TP/PP."""

import pytest
import torch
from train_testlib import tiny_arch

from megatron_outeff.checkpoint_format import variant_hf_shapes
from megatron_outeff.megatron.variant import AttentionVariantConfig
from megatron_outeff.models.hf_opt import hf_expected_shapes, hf_state_dict_to_megatron, megatron_to_hf_state_dict

ARCH = tiny_arch("opt", ffn_hidden_size=128)


@pytest.mark.parametrize("gate", ["linear", "mlp", "shared_linear"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (4, 1)])
def test_variant_round_trip(gate, tp, pp):
    torch.manual_seed(0)
    variant = AttentionVariantConfig(softmax="learnable", gate=gate)
    shapes = {**hf_expected_shapes(ARCH), **variant_hf_shapes(ARCH, variant)}
    hf = {k: torch.randn(s) for k, s in shapes.items()}
    ranks = {
        (t, p): hf_state_dict_to_megatron(hf, ARCH, t, tp, p, pp, variant=variant) for t in range(tp) for p in range(pp)
    }
    # per-rank: this rank's heads of the offset and gate
    sd = ranks[(tp - 1, pp - 1)]
    heads = 4 // tp
    off = hf[f"model.decoder.layers.{ARCH.num_layers - 1}.self_attn.softmax_offset"]
    local = ARCH.num_layers // pp - 1
    assert torch.equal(sd[f"decoder.layers.{local}.self_attention.core_attention.softmax_offset"], off[-heads:])
    bias = "fc2_bias" if gate == "mlp" else "bias"
    assert torch.equal(
        sd[f"decoder.layers.{local}.self_attention.head_gate.bias"],
        hf[f"model.decoder.layers.{ARCH.num_layers - 1}.self_attn.gate.{bias}"][-heads:],
    )
    back = megatron_to_hf_state_dict(ranks, ARCH, variant=variant)
    assert sorted(back) == sorted(list(hf) + ["lm_head.weight"])
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_plain_behaviour_unchanged():
    torch.manual_seed(0)
    hf = {k: torch.randn(s) for k, s in hf_expected_shapes(ARCH).items()}
    ranks = {(t, 0): hf_state_dict_to_megatron(hf, ARCH, t, 2) for t in range(2)}
    assert not any("head_gate" in k or "softmax_offset" in k for k in ranks[(0, 0)])
    ranks[(0, 0)]["decoder.layers.0.self_attention.core_attention.softmax_offset"] = torch.zeros(2)
    ranks[(1, 0)]["decoder.layers.0.self_attention.core_attention.softmax_offset"] = torch.zeros(2)
    with pytest.raises(ValueError, match="without a Hugging Face OPT counterpart"):
        megatron_to_hf_state_dict(ranks, ARCH)  # strict, no variant: refused as before
    extra = {"model.decoder.layers.0.self_attn.softmax_offset": torch.zeros(4)}
    with pytest.raises(ValueError, match="unknown to OPT"):
        hf_state_dict_to_megatron({**hf, **extra}, ARCH)


def test_unknown_missing_and_misshapen_variant_tensors_are_one_line_errors():
    """The mapping takes exactly the variant's described tensors: another variant's tensor, a missing one or
    a wrong shape is a one-line OutEffError naming it (never a KeyError)."""
    from megatron_outeff.errors import OutEffError

    variant = AttentionVariantConfig(softmax="learnable", gate="linear")
    hf = {k: torch.zeros(s) for k, s in {**hf_expected_shapes(ARCH), **variant_hf_shapes(ARCH, variant)}.items()}
    cases = [
        (
            {**hf, "model.decoder.layers.0.self_attn.gate.fc1_weight": torch.zeros(4, 4, 16)},
            "gate.fc1_weight: not a tensor",
        ),
        ({k: v for k, v in hf.items() if k != "model.decoder.layers.2.self_attn.gate.bias"}, "missing"),
        ({**hf, "model.decoder.layers.1.self_attn.softmax_offset": torch.zeros(3)}, r"shape \(3,\), expected \(4,\)"),
        (
            {**hf, "model.decoder.layers.9.self_attn.softmax_offset": torch.zeros(4)},
            "layers.9.self_attn.softmax_offset: not",
        ),
    ]
    for sd, needle in cases:
        with pytest.raises(OutEffError, match=needle) as e:
            hf_state_dict_to_megatron(sd, ARCH, variant=variant)
        assert "\n" not in str(e.value)
    ranks = {(0, 0): hf_state_dict_to_megatron(hf, ARCH, variant=variant)}
    with pytest.raises(OutEffError, match="lacks 'decoder.layers.0.self_attention.head_gate.fc1_weight'"):
        megatron_to_hf_state_dict(ranks, ARCH, variant=AttentionVariantConfig(softmax="learnable", gate="mlp"))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (4, 1)])
def test_elementwise_gate_rows_fused_as_megatron_lays_them_out(tp, pp):
    """The elementwise gate (Hugging Face's self_attn.gate_proj) lives in megatron's linear_qkv: per head the
    rows are [q_h | gate_h | k_h | v_h] (megatron-core's attention_output_gate layout), rank r of T holding its
    heads' blocks; weights and biases; the round trip is exact."""
    variant = AttentionVariantConfig(softmax="learnable", gate="elementwise")
    shapes = {**hf_expected_shapes(ARCH), **variant_hf_shapes(ARCH, variant)}
    assert shapes["model.decoder.layers.0.self_attn.gate_proj.weight"] == (64, 64)
    torch.manual_seed(1)
    hf = {k: torch.randn(s) for k, s in shapes.items()}
    ranks = {
        (t, p): hf_state_dict_to_megatron(hf, ARCH, t, tp, p, pp, variant=variant) for t in range(tp) for p in range(pp)
    }
    H, d, per_stage = 4, 16, ARCH.num_layers // pp
    for (t, p), sd in ranks.items():
        for local in range(per_stage):
            hp = f"model.decoder.layers.{p * per_stage + local}.self_attn."
            for kind in ("weight", "bias"):
                want = torch.cat(
                    [
                        hf[f"{hp}{proj}.{kind}"][h * d : (h + 1) * d]
                        for h in range(t * H // tp, (t + 1) * H // tp)
                        for proj in ("q_proj", "gate_proj", "k_proj", "v_proj")
                    ]
                )
                assert torch.equal(sd[f"decoder.layers.{local}.self_attention.linear_qkv.{kind}"], want)
            assert not any("gate_proj" in k for k in sd)
    back = megatron_to_hf_state_dict(ranks, ARCH, variant=variant)
    assert sorted(back) == sorted(list(hf) + ["lm_head.weight"])
    assert all(torch.equal(back[k], hf[k]) for k in hf)
