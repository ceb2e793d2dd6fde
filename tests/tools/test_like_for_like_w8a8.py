"""Like-for-like W8A8: the paper-protocol simulation quantizes the same operations in every variant.
A vanilla model is exported as plain transformers OPT (no Q K^T / softmax / P V / residual points);
the evaluation runs it through OutEffOPT(softmax="vanilla") instead, so its quantized op set equals
Softmax_1's and differs from a gated model's only by the (unquantized) gate modules."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf"))
from hf_testlib import TINY, random_weights  # noqa: E402
from tolerance import assert_close_bound, network_depth, rounding_bound  # noqa: E402

from megatron_outeff.evaluation.quant_eval import (
    SIMULATED_EXCLUDE,
    load_hf_model,
    quantizable_model,  # noqa: E402
    simulated_w8a8_perplexity,
)
from megatron_outeff.hf import export_hf_dir, resolve_variant  # noqa: E402
from megatron_outeff.quant import apply_simulated_w8a8  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("l4l")
    os.environ.setdefault("HF_HOME", str(root / "hf_home"))
    out = {}
    for name, variant in (
        ("vanilla", "vanilla"),
        ("softmax1", "softmax1"),
        ("gated_softmax1", {"softmax": "softmax1", "gate": "linear"}),
    ):
        sd, extra = random_weights(resolve_variant(variant), seed=1)
        out[name] = load_hf_model(export_hf_dir(root / name, sd, TINY, variant, extra_state=extra))
    return out


def op_set(model, ids):
    sim = apply_simulated_w8a8(quantizable_model(model), lambda m: m(input_ids=ids), exclude=SIMULATED_EXCLUDE)
    assert not sim.uncalibrated
    return set(sim.act_quantizers), set(sim.weight_quantizers)


def test_vanilla_export_is_plain_opt_but_quantized_like_the_others(models):
    assert models["vanilla"].config.model_type == "opt"  # the deployment export stays plain OPT
    ids = torch.randint(3, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    acts = {n: op_set(m, ids) for n, m in models.items()}
    assert acts["vanilla"] == acts["softmax1"]
    act_v, w_v = acts["vanilla"]
    act_g, w_g = acts["gated_softmax1"]
    assert {n for n in act_g ^ act_v} <= {n for n in act_g | act_v if ".gate" in n}  # only gates may differ
    assert w_g == w_v
    per_layer_points = {
        "self_attn.qk_quant",
        "self_attn.softmax_quant",
        "self_attn.pv_quant",
        "attn_residual_quant",
        "ffn_residual_quant",
    }
    for i in range(TINY["num_hidden_layers"]):
        assert {f"model.decoder.layers.{i}.{p}" for p in per_layer_points} <= act_v
    print({n: len(a) for n, (a, _) in acts.items()})  # quantized activation tensors per model


def test_quantizable_model_keeps_the_float_function(models):
    # oracle: transformers' own OPT forward of the same weights
    van = models["vanilla"]
    ids = torch.randint(3, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = van(input_ids=ids).logits
        got = quantizable_model(van)(input_ids=ids).logits
    assert type(quantizable_model(van)).__name__ == "OutEffOPTForCausalLM"
    # the same function computed by two module trees in float32: rounding only (tests/tolerance.py)
    assert_close_bound(got, ref, rounding_bound(torch.float32, max(1.0, ref.abs().max().item()), network_depth(TINY)))


def test_simulated_perplexity_counts_match(models):
    ids = torch.randint(3, TINY["vocab_size"], (4, 12), generator=torch.Generator().manual_seed(2))
    res = {n: simulated_w8a8_perplexity(m, ids, [ids[:2]], batch_size=2) for n, m in models.items()}
    assert res["vanilla"]["quantized_activations"] == res["softmax1"]["quantized_activations"]
    assert res["vanilla"]["quant_points"] == res["softmax1"]["quant_points"] == 5 * TINY["num_hidden_layers"]
    assert res["vanilla"]["quantized_weights"] == res["softmax1"]["quantized_weights"]
