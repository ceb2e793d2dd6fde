"""Non-finite values in calibration and inference (issue 19 items 8, 9).

Calibration refuses NaN / +-inf data, naming the module and the batch (a NaN range used to become a
quantization scale of 1.0 and a broken deployable checkpoint); a genuinely zero range still gets the
fallback scale. At inference every path treats non-finite inputs alike: the float Linear, the
simulated W8A8 Linear (our compressed-tensors emulation), the paper's simulated protocol and the real
int8 Linear all give a non-finite output row for an input row holding NaN or +-inf, and finite rows
elsewhere (the oracle: the float path)."""

import pytest
import torch
from tolerance import rounding_bound

from megatron_outeff.errors import OutEffError
from megatron_outeff.quant import apply_simulated_w8a8, quantize_weight_per_channel
from megatron_outeff.quant.compressed_tensors_export import (
    LinearW8A8,
    export_compressed_tensors_w8a8,
    simulate_w8a8_linear,
)
from megatron_outeff.quant.int8_linear import Int8Linear
from megatron_outeff.quant.quantizers import ActivationQuantizer, asymmetric_qparams, symmetric_qparams

NONFINITE = [float("nan"), float("inf"), -float("inf")]


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(8, 512, (2, 12), generator=g) for _ in range(n)]


def _poison_embedding_row(model, token, value):
    """Set one token's input embedding row (element 0) to ``value``: a batch holding that token feeds a
    non-finite activation to the layers after the embedding."""
    with torch.no_grad():
        model.get_input_embeddings().weight[token, 0] = value


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
def test_calibration_refuses_nonfinite_naming_module_and_batch(tiny_opt, tmp_path, value):
    """Calibration data whose second batch holds a non-finite embedding (the weights are finite: the
    weight check passes, the data check must fire)."""
    embed = tiny_opt.get_input_embeddings()
    with torch.no_grad():
        inputs = [embed(b) for b in _batches()]
    inputs[1][1, 5, 3] = value
    calib = lambda m: [m(inputs_embeds=e) for e in inputs]  # noqa: E731
    # the deployable export: refused, nothing written
    with pytest.raises(
        OutEffError,
        match=r"^Linear 'model\.decoder\.layers\.0\.self_attn\.q_proj' input, "
        r"calibration batch 2: \d+ non-finite value",
    ):
        export_compressed_tensors_w8a8(tiny_opt, calib, tmp_path / "w8a8")
    assert list(tmp_path.iterdir()) == []
    # the paper's simulated protocol (every module output quantized): the first module that sees it
    with pytest.raises(
        OutEffError,
        match=r"^module 'model\.decoder\.layers\.0\.self_attn_layer_norm' output, "
        r"calibration batch 2: ",
    ):
        apply_simulated_w8a8(tiny_opt, calib)


def test_zero_range_keeps_its_fallback_scale_and_nan_range_is_refused():
    q = ActivationQuantizer(8)
    q(torch.zeros(4, 5))  # a genuinely zero range: any scale represents it; 1 is used
    assert float(q.scale) == 1.0 and float(q.zero_point) == 0.0
    assert float(symmetric_qparams(torch.tensor(0.0))[0]) == 1.0
    for bad in NONFINITE:
        with pytest.raises(OutEffError, match="quantization range"):
            symmetric_qparams(torch.tensor(bad))
        with pytest.raises(OutEffError, match="quantization range"):
            asymmetric_qparams(torch.tensor(-1.0), torch.tensor(bad))
        with pytest.raises(OutEffError, match="calibration activation"):
            ActivationQuantizer(8)(torch.tensor([[1.0, bad]]))


def _linear_params(seed=0, out_f=24, in_f=40):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.1
    bias = torch.randn(out_f, generator=g)
    q, s = quantize_weight_per_channel(w)
    p = LinearW8A8(
        weight=q,
        weight_scale=s,
        input_scale=torch.tensor([0.02]),
        input_zero_point=torch.tensor([-3], dtype=torch.int8),
        bias=bias,
    )
    return w, bias, p


@pytest.mark.parametrize("value", NONFINITE, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("rows", [5, 3000], ids=["small", "blocked"])  # 3000 x 40 > GRAIN_SIZE: the row blocks
@pytest.mark.parametrize("threads", [1, 2])
def test_every_linear_path_propagates_nonfinite_rows(value, rows, threads):
    w, bias, p = _linear_params()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 40, generator=g)
    bad_rows = [0, 2, rows - 1]
    for r in bad_rows:
        x[r, (7 * r) % 40] = value
    want = torch.zeros(rows, dtype=torch.bool)
    want[bad_rows] = True
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outputs = {
            "float": torch.nn.functional.linear(x, w, bias),
            "simulated w8a8": simulate_w8a8_linear(x, p),
            "int8 reduce_range": Int8Linear.from_params(p, reduce_range=True)(x),
            "int8 emulate": Int8Linear.from_params(p, reduce_range=True).emulate(x),
        }
    finally:
        torch.set_num_threads(before)
    assert bool((~torch.isfinite(outputs["float"])).all(1).eq(want).all())  # the oracle's premise
    for name, y in outputs.items():
        nonfinite = ~torch.isfinite(y)
        assert torch.equal(nonfinite.all(1), want) and torch.equal(nonfinite.any(1), want), name
    # finite rows are untouched by the marking: the int8 module equals its emulation there
    ok = ~want
    # (the 4 roundings of the int8 output path: test_int8_linear._emulate_bound)
    i8, emu = outputs["int8 reduce_range"][ok].double(), outputs["int8 emulate"][ok]
    b = p.bias.double()
    torch.testing.assert_close(
        i8, emu, rtol=0, atol=rounding_bound(torch.float32, float(((emu - b).abs() + b.abs()).max()), 4)
    )


def test_simulated_protocol_propagates_nonfinite_after_calibration(tiny_opt):
    """The paper's protocol, calibrated on clean data, evaluates a batch whose row 0 holds a token with a
    NaN / inf embedding at position 4: the same positions give non-finite logits as in the float model
    (row 0 from position 4 on, at least), the other row stays finite. (The float model's LM head is tied to the embedding, so its logit column of
    that token is non-finite everywhere; the simulated copy's head is untied and float: columns compared
    exclude that token.)"""
    batches = _batches(2)
    sim = apply_simulated_w8a8(tiny_opt, lambda m: [m(b) for b in batches])
    token = 7
    ids = batches[0].clone()
    ids[0, 4] = token
    cols = torch.arange(512) != token
    for value in NONFINITE:
        _poison_embedding_row(tiny_opt, token, value)
        _poison_embedding_row(sim.model, token, value)  # the copy's (quantized) embedding, same row
        with torch.no_grad():
            outputs = {"float": tiny_opt(ids).logits[..., cols], "simulated": sim.model(ids).logits[..., cols]}
        finite = {name: torch.isfinite(y).all(-1) for name, y in outputs.items()}
        # the float model's pattern is the oracle (masked scores of the non-finite key reach earlier
        # positions of its row too); the clean row stays finite
        assert not finite["float"][0, 4:].any() and finite["float"][1].all(), value
        assert torch.equal(finite["simulated"], finite["float"]), value
