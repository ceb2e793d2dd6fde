"""Quantization sensitivity as a dose-response (issue 21 item 3): the paper's per-tensor static protocol
swept over activation widths, b* by hand, bit widths outside 2-16 refused in one line, position 0 kept
in float and out of calibration (PrefixQuant-style) against an oracle quantizer on the other entries,
and the pipeline control's premise: at 2-4 activation bits every model loses, and with a planted
first-token massive activation the position-0 exclusion recovers most of the loss."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf"))
from hf_testlib import TINY, random_weights  # noqa: E402

from megatron_outeff.errors import OutEffError  # noqa: E402
from megatron_outeff.evaluation.quant_eval import (
    activation_bit_sweep,
    check_bits,
    first_token_mask,  # noqa: E402
    load_hf_model,
    quantized_activation_ranges,
    sensitivity_bits,
    simulated_w8a8_perplexity,
)
from megatron_outeff.hf import export_hf_dir, resolve_variant  # noqa: E402
from megatron_outeff.quant import apply_simulated_w8a8  # noqa: E402
from megatron_outeff.quant.quantizers import ActivationQuantizer  # noqa: E402


@pytest.mark.parametrize("bits", [1, 17, 0, 8.0, True, "8"])
def test_bit_width_outside_2_to_16_is_one_line(bits):
    with pytest.raises(OutEffError) as e:
        check_bits(bits, "act_bits")
    assert str(e.value) == f"act_bits={bits!r}: expected an integer bit width from 2 to 16"
    assert check_bits(2) == 2 and check_bits(16) == 16


def test_b_star_by_hand():
    assert sensitivity_bits({8: 0.001, 6: 0.01, 5: 0.049, 4: 0.3}) == 5
    assert sensitivity_bits({8: 0.001, 6: 0.2, 5: 0.01, 4: 0.5}) == 8  # 5 passes but 6 fails: not 5
    assert sensitivity_bits({8: 0.06, 6: 0.2, 5: 0.3, 4: 0.5}) is None
    assert sensitivity_bits({8: 0.0, 6: 0.0, 5: 0.0, 4: 0.0}) == 4
    assert sensitivity_bits({8: 0.05, 6: 0.0}) is None  # < 5%, not <=


def test_first_token_mask_layouts():
    b, s, d, h = 2, 5, 3, 4
    m = first_token_mask("x.self_attn.qk_quant", torch.zeros(b, h, s, s), (b, s))
    assert m[:, :, 0, :].all() and m[:, :, :, 0].all() and m.sum() == b * h * (2 * s - 1)
    m = first_token_mask("x.self_attn.pv_quant", torch.zeros(b, h, s, d), (b, s))
    assert m[:, :, 0].all() and m.sum() == b * h * d
    m = first_token_mask("x.q_proj", torch.zeros(b, s, d), (b, s))
    assert m[:, 0].all() and m.sum() == b * d
    m = first_token_mask("x.fc2", torch.zeros(b * s, d), (b, s))  # HF OPT's flattened FFN, b-major rows
    assert m.sum() == b * d and m[0].all() and m[s].all() and not m[1].any()
    with pytest.raises(ValueError, match="x.weird: output of shape"):
        first_token_mask("x.weird", torch.zeros(7, 3), (b, s))


def test_kept_entries_stay_float_and_out_of_the_range():
    """keep_float: the kept entries pass through unchanged; the others are quantized exactly as an
    ActivationQuantizer calibrated on them alone would quantize them (the oracle)."""
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 6, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_out = lin(x)
    x_big = x.clone()
    x_big[:, 0] *= 100.0  # a first-token outlier
    seen = []

    def keep(name, out, input_shape):  # the model's input shape comes along; token axis 1 here
        seen.append(input_shape)
        m = torch.zeros_like(out, dtype=torch.bool)
        m[:, 0] = True
        return m

    sim = apply_simulated_w8a8(torch.nn.Sequential(lin), lambda m: m(x_big), exclude=(), act_bits=4, keep_float=keep)
    with torch.no_grad():
        got = sim.model(x_big)
        wq_out = torch.nn.functional.linear(x_big, sim.model[0].weight, sim.model[0].bias)
    assert seen == [(3, 6, 4), (3, 6, 4)]
    oracle = ActivationQuantizer(4)
    mask = torch.zeros_like(wq_out, dtype=torch.bool)
    mask[:, 0] = True
    want = wq_out.clone()
    want[~mask] = oracle(wq_out[~mask])  # calibrates on the non-kept entries, then quantizes them
    assert torch.equal(got[:, 0], wq_out[:, 0])  # position 0: float (after the quantized weight)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, ref_out)  # and something was quantized


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    os.environ.setdefault("HF_HOME", str(root / "hf_home"))
    sd, extra = random_weights(resolve_variant("vanilla"), seed=3)
    out = {
        name: load_hf_model(export_hf_dir(root / name, sd, TINY, "vanilla", extra_state=extra))
        for name in ("plain", "massive")
    }
    with torch.no_grad():  # a planted first-token massive activation: position 0's embedding x 200
        out["massive"].model.decoder.embed_positions.weight[2] *= 200.0  # OPT's learned positions: offset 2
    g = torch.Generator().manual_seed(4)
    out["blocks"] = torch.randint(3, TINY["vocab_size"], (8, 16), generator=g)
    out["calib"] = list(torch.randint(3, TINY["vocab_size"], (4, 16), generator=g).split(4))
    return out


def test_sweep_dose_response_and_first_token_exclusion(tiny):
    """Random weights: quantization noise moves the perplexity either way, so the checks are on its
    size: 8 bits is nearly harmless, 2 bits never; with the planted first-token activation, position 0
    sets the ranges and keeping it float removes most of the damage at 4 bits."""
    sweeps = {
        n: activation_bit_sweep(tiny[n], tiny["blocks"], tiny["calib"], act_bits=(8, 4, 2), batch_size=4)
        for n in ("plain", "massive")
    }
    for n, sw in sweeps.items():
        inc = {b: p["increase"] for b, p in sw["all"].items()}
        assert inc == {b: p["ppl"] / sw["fp32_ppl"] - 1 for b, p in sw["all"].items()}
        assert abs(inc[2]) > 0.05 and abs(inc[2]) > 5 * abs(inc[8]), (n, inc)
        assert sw["b_star"]["all"] == sensitivity_bits(inc)
        assert sw["b_star"]["first_token_float"] == sensitivity_bits(
            {b: p["increase"] for b, p in sw["first_token_float"].items()}
        )
    # the A8 point is the plain simulated W8A8 number
    assert (
        sweeps["plain"]["all"][8]["ppl"]
        == simulated_w8a8_perplexity(tiny["plain"], tiny["blocks"], tiny["calib"], batch_size=4)["ppl"]
    )
    m = sweeps["massive"]
    assert abs(m["first_token_float"][4]["increase"]) < 0.5 * abs(m["all"][4]["increase"]), m
    ranges = quantized_activation_ranges(tiny["massive"], tiny["blocks"], batch_size=4)
    rest = quantized_activation_ranges(tiny["massive"], tiny["blocks"], batch_size=4, exclude_first_token=True)
    # one token dominating a tensor of n rows drives max|x| / RMS towards sqrt(n) (here 8 x 16 rows: 11.3)
    assert ranges["max"] > 1.5 * rest["max"] and ranges["max_tensor"] in ranges["tensors"]
    assert (
        len(ranges["tensors"])
        == simulated_w8a8_perplexity(tiny["massive"], tiny["blocks"], tiny["calib"], batch_size=4)[
            "quantized_activations"
        ]
    )


def test_report_metrics_a_quantizer_sees(tiny):
    """evaluation.report: MA / RI / first-token ratio per layer output against the formulas applied to
    transformers' own hidden states (output_hidden_states; entry i + 1 is layer i's output for every
    layer but the last, whose entry is after the final LayerNorm); the planted activation shows."""
    from megatron_outeff.evaluation.report import ReportSettings, collect_model_stats
    from megatron_outeff.metrics import first_token_norm_ratio, massive_activation_ratio, range_inflation

    stats = {
        n: collect_model_stats(tiny[n], tiny["blocks"], ReportSettings(batch_size=4)) for n in ("plain", "massive")
    }
    with torch.no_grad():
        hs = tiny["massive"](input_ids=tiny["blocks"], output_hidden_states=True).hidden_states
    row = stats["massive"]["layers"][0]
    assert row["massive_activation"] == pytest.approx(massive_activation_ratio(hs[1], token_dim=1), rel=1e-5)
    assert row["range_inflation"] == pytest.approx(range_inflation(hs[1], token_dim=1), rel=1e-5)
    assert row["first_token_norm_ratio"] == pytest.approx(first_token_norm_ratio(hs[1], token_dim=1), rel=1e-5)
    a, b = stats["massive"]["aggregates"], stats["plain"]["aggregates"]
    assert (
        a["max_massive_activation"] > 5 * b["max_massive_activation"]
        and a["max_range_inflation"] > 5 * b["max_range_inflation"]
    )
    assert a["first_token_excess_norm"] == pytest.approx(
        max(r["first_token_norm_ratio"] for r in stats["massive"]["layers"]) - 1
    )
    assert a["max_absmax_over_rms_component"] in stats["massive"]["components"]


def test_report_first_token_sources(tiny):
    """evaluation.report: ||x_0|| per source against the same modules' outputs captured independently."""
    from megatron_outeff.evaluation.report import ReportSettings, collect_model_stats

    m = tiny["massive"]
    dec = m.model.decoder
    seen = {}
    hooks = [
        dec.embed_positions.register_forward_hook(lambda mod, a, out: seen.__setitem__("pos", out.detach().double())),
        dec.layers[0].fc2.register_forward_hook(lambda mod, a, out: seen.__setitem__("fc2", out.detach().double())),
    ]
    with torch.no_grad():
        m(input_ids=tiny["blocks"])
    for h in hooks:
        h.remove()
    src = collect_model_stats(m, tiny["blocks"], ReportSettings(batch_size=4))["first_token_norm_sources"]
    s = tiny["blocks"].shape[1]
    want_pos = seen["pos"].reshape(-1, s, seen["pos"].shape[-1])[:, 0].norm(dim=-1).mean().item()
    want_fc2 = seen["fc2"].reshape(-1, s, seen["fc2"].shape[-1])[:, 0].norm(dim=-1).mean().item()
    assert src["embed_positions"] == pytest.approx(want_pos, rel=1e-6) and src["layer0.fc2"] == pytest.approx(
        want_fc2, rel=1e-6
    )
    assert src["embed_positions"] > 20 * src["embed_tokens"]  # the planted position-0 embedding
