"""Quantizers against scales, zero points and codes computed by hand."""

import pytest
import torch

from megatron_outeff.quant import (
    ActivationQuantizer,
    WeightQuantizer,
    asymmetric_qparams,
    fake_quantize,
    mse_search_absmax,
    percentile,
    quantize_weight_per_channel,
    symmetric_qparams,
)


def test_symmetric_weight_minmax_by_hand():
    w = torch.tensor([-1.27, 0.5, 0.005, 0.015, 1.0])
    wq = WeightQuantizer()
    out = wq(w)
    assert wq.scale.item() == pytest.approx(0.01)  # 1.27 / 127
    assert wq.zero_point.item() == 0
    # codes: -127, 50, round(0.5)=0 (half to even), round(1.5)=2, 100
    assert out.tolist() == pytest.approx([-1.27, 0.5, 0.0, 0.02, 1.0], abs=1e-7)
    wq.freeze()
    # frozen: the range stays; 2.0 clamps to 127 * 0.01
    assert wq(torch.tensor([2.0, -2.0])).tolist() == pytest.approx([1.27, -1.28], abs=1e-6)


def test_asymmetric_qparams_by_hand():
    scale, zp = asymmetric_qparams(torch.tensor(-1.0), torch.tensor(4.1))
    assert scale.item() == pytest.approx(5.1 / 255)  # 0.02
    assert zp.item() == 50  # round(1.0 / 0.02)
    # code = clamp(round(x / 0.02 + 50), 0, 255); x_hat = (code - 50) * 0.02
    x = torch.tensor([-2.0, -1.0, 0.0, 0.011, 4.1, 9.0])
    out = fake_quantize(x, scale, zp, 0, 255)
    assert out.tolist() == pytest.approx([-1.0, -1.0, 0.0, 0.02, 4.1, 4.1], abs=1e-6)
    # range widened to contain 0: [0.5, 2.55] -> [0, 2.55]
    scale, zp = asymmetric_qparams(torch.tensor(0.5), torch.tensor(2.55))
    assert scale.item() == pytest.approx(0.01) and zp.item() == 0
    # all-zero range: scale 1, exact zeros
    scale, zp = symmetric_qparams(torch.tensor(0.0))
    assert scale.item() == 1.0 and zp.item() == 0


def test_percentile_by_hand():
    x = torch.arange(200_001, dtype=torch.float32)  # values 0..200000
    # position p/100 * (n - 1): 99.999 -> 199998, 0.001 -> 2
    assert percentile(x, 99.999).item() == 199998.0
    assert percentile(x, 0.001).item() == 2.0
    # interpolation: [0, 10, 20, 30], 50th percentile at position 1.5 -> 15
    assert percentile(torch.tensor([30.0, 0.0, 20.0, 10.0]), 50).item() == 15.0


def test_activation_running_minmax_momentum_and_percentile():
    aq = ActivationQuantizer(percentile=None)
    aq(torch.tensor([-1.0, 2.0]))
    assert (aq.running_min.item(), aq.running_max.item()) == (-1.0, 2.0)  # first batch initialises
    aq(torch.tensor([-3.0, 12.0]))
    # 0.9 * old + 0.1 * new
    assert aq.running_min.item() == pytest.approx(-1.2)
    assert aq.running_max.item() == pytest.approx(3.0)
    assert aq.scale.item() == pytest.approx(4.2 / 255)
    assert aq.zero_point.item() == round(1.2 / (4.2 / 255))  # 73
    aq.freeze()
    before = (aq.running_min.item(), aq.running_max.item())
    out = aq(torch.tensor([100.0, 0.0]))
    assert (aq.running_min.item(), aq.running_max.item()) == before  # frozen: no update
    assert out[0].item() == pytest.approx((255 - 73) * 4.2 / 255, rel=1e-6)  # clamped at the top
    assert out[1].item() == 0.0  # zero exact
    # percentile clipping: one huge outlier among 200001 values is clipped away
    x = torch.arange(200_001, dtype=torch.float32)
    x[-1] = 1e9
    aq = ActivationQuantizer()
    aq(x)
    assert aq.running_max.item() == 199998.0 and aq.running_min.item() == 2.0
    assert aq.zero_point.item() == 0


def test_mse_search_picks_clipped_range():
    # Values exactly on the grid of range 1 (k / 127), repeated, plus one outlier 1.01.
    # Range 1.01: every grid value is off its grid by up to half a step -> large total error;
    # range 1 (ratio 1/1.01): all exact, only the outlier's 0.01 clip error.
    base = torch.arange(-127, 128, dtype=torch.float32) / 127
    w = torch.cat([base.repeat(40), torch.tensor([1.01])])
    best = mse_search_absmax(w, ratios=[1.0, 1 / 1.01])
    assert best.item() == pytest.approx(1.0, abs=1e-6)
    wq = WeightQuantizer(method="mse", ratios=[1.0, 1 / 1.01])
    wq(w)
    assert wq.scale.item() == pytest.approx(1 / 127, rel=1e-6)
    # the default grid (0.01 ... 1.00) keeps the full range for a clean Gaussian-free uniform tensor
    u = torch.linspace(-1, 1, 1001)
    assert mse_search_absmax(u).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ratios"):
        mse_search_absmax(w, ratios=[0.0])


def test_per_channel_int8_by_hand():
    w = torch.tensor([[1.27, -0.635, 0.0], [0.0, 0.0, 0.0], [-2.54, 0.01, 1.0]])
    q, scale = quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (3, 1)
    assert scale.flatten().tolist() == pytest.approx([0.01, 1.0, 0.02])
    # row 0: 127, -63.5 -> -64 (half to even), 0; row 2: -127, 0.5 -> 0, 50
    assert q.tolist() == [[127, -64, 0], [0, 0, 0], [-127, 0, 50]]
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight_per_channel(torch.tensor([[float("nan"), 1.0]]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        WeightQuantizer(method="max")
    with pytest.raises(ValueError, match="momentum"):
        ActivationQuantizer(momentum=1.0)
    with pytest.raises(ValueError, match="n_bits"):
        WeightQuantizer(n_bits=1)
    with pytest.raises(ValueError, match="no range"):
        ActivationQuantizer().freeze()(torch.ones(2))
