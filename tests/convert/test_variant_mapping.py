"""megatron <-> Hugging Face mapping of the attention-variant tensors (models/hf_opt.py), any TP/PP."""
import pytest
import torch

from megatron_outeff.checkpoint_format import variant_hf_shapes
from megatron_outeff.megatron.variant import AttentionVariantConfig
from megatron_outeff.models.hf_opt import hf_expected_shapes, hf_state_dict_to_megatron, megatron_to_hf_state_dict
from megatron_outeff.models.opt import OPTArchConfig

ARCH = OPTArchConfig(name="t", num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, vocab_size=200,
                     max_position_embeddings=32)


@pytest.mark.parametrize("gate", ["linear", "mlp", "shared_linear"])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (4, 1)])
def test_variant_round_trip(gate, tp, pp):
    torch.manual_seed(0)
    shapes = {**hf_expected_shapes(ARCH), **variant_hf_shapes(ARCH, AttentionVariantConfig(softmax="learnable", gate=gate))}
    hf = {k: torch.randn(s) for k, s in shapes.items()}
    ranks = {(t, p): hf_state_dict_to_megatron(hf, ARCH, t, tp, p, pp, variant_extras=True)
             for t in range(tp) for p in range(pp)}
    # per-rank: this rank's heads of the offset and gate
    sd = ranks[(tp - 1, pp - 1)]
    heads = 4 // tp
    off = hf[f"model.decoder.layers.{ARCH.num_layers - 1}.self_attn.softmax_offset"]
    local = ARCH.num_layers // pp - 1
    assert torch.equal(sd[f"decoder.layers.{local}.self_attention.core_attention.softmax_offset"], off[-heads:])
    bias = "fc2_bias" if gate == "mlp" else "bias"
    assert torch.equal(sd[f"decoder.layers.{local}.self_attention.head_gate.bias"],
                       hf[f"model.decoder.layers.{ARCH.num_layers - 1}.self_attn.gate.{bias}"][-heads:])
    back = megatron_to_hf_state_dict(ranks, ARCH, variant_extras=True)
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
        megatron_to_hf_state_dict(ranks, ARCH)  # strict, no variant_extras: refused as before
    extra = {"model.decoder.layers.0.self_attn.softmax_offset": torch.zeros(4)}
    with pytest.raises(ValueError, match="unknown to OPT"):
        hf_state_dict_to_megatron({**hf, **extra}, ARCH)
