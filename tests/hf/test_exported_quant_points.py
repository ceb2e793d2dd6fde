"""The simulated W8A8 pass finds the QuantPoints of an exported remote-code model.

An export ships its own copy of QuantPoint (so the directory loads without megatron_outeff); that copy
is a different class object, and the pass must still quantize Q K^T, softmax, P V and residual sums.
"""

import torch
from hf_testlib import TINY, random_weights

from megatron_outeff.hf import QUANT_POINTS_PER_LAYER, export_hf_dir, resolve_variant
from megatron_outeff.quant.points import QuantPoint
from megatron_outeff.quant.simulated import apply_simulated_w8a8


def test_simulated_w8a8_quantizes_exported_quant_points(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    variant = {"softmax": "softmax1"}
    opt_sd, extra = random_weights(resolve_variant(variant), seed=3)
    out = export_hf_dir(tmp_path / "export", opt_sd, TINY, variant, extra_state=extra)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    points = [n for n, m in model.named_modules() if type(m).__name__ == "QuantPoint"]
    assert len(points) == QUANT_POINTS_PER_LAYER * TINY["num_hidden_layers"]
    assert not any(isinstance(m, QuantPoint) for m in model.modules())  # the export's own class

    ids = torch.randint(3, TINY["vocab_size"], (2, 16))
    sim = apply_simulated_w8a8(model, lambda m: m(ids))
    quantized_points = [n for n in sim.act_quantizers if n in points]
    assert sorted(quantized_points) == sorted(points)
    assert not sim.uncalibrated
    without_points = apply_simulated_w8a8(model, lambda m: m(ids), exclude=("lm_head", "*_quant"))
    assert not any(n in without_points.act_quantizers for n in points)
    with torch.no_grad():
        float_logits = model(ids).logits
        quant_logits, partly_quant_logits = sim.model(ids).logits, without_points.model(ids).logits
    assert torch.isfinite(quant_logits).all()
    assert (quant_logits - float_logits).abs().max() > 0
    assert (quant_logits - partly_quant_logits).abs().max() > 0  # the points themselves are quantized
