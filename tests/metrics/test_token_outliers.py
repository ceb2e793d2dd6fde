"""Token-wise outlier metrics against values computed by hand on constructed attention maps and
hidden states."""

import math

import pytest
import torch

from megatron_outeff.metrics import first_token_mass_per_head, first_token_norm_ratio, masked_mean, sink_head_share


def probs_by_hand():
    # b=1, h=2, sq=3, sk=3. Head 0 puts 1.0, 0.5, 0.2 on key 0 at queries 0,1,2; head 1 0.0, 0.1, 0.9.
    p = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    p[0, 0, :, 0] = torch.tensor([1.0, 0.5, 0.2], dtype=torch.float64)
    p[0, 1, :, 0] = torch.tensor([0.0, 0.1, 0.9], dtype=torch.float64)
    return p


def test_first_token_mass_all_and_masked_rows():
    p = probs_by_hand()
    all_rows = first_token_mass_per_head(p)
    assert all_rows.tolist() == pytest.approx([(1.0 + 0.5 + 0.2) / 3, (0.0 + 0.1 + 0.9) / 3], abs=1e-12)
    idle = torch.tensor([[False, True, True]])  # queries 1 and 2
    assert first_token_mass_per_head(p, idle).tolist() == pytest.approx([0.35, 0.5], abs=1e-12)
    only_q1 = torch.tensor([[False, True, False]])
    assert first_token_mass_per_head(p, only_q1).tolist() == pytest.approx([0.5, 0.1], abs=1e-12)
    with pytest.raises(ValueError, match="query_mask"):
        first_token_mass_per_head(p, torch.ones(2, 3, dtype=torch.bool))


def test_sink_head_share_threshold():
    assert sink_head_share(torch.tensor([0.9, 0.31, 0.3, 0.0], dtype=torch.float64)) == 0.5  # strictly above 0.3
    assert sink_head_share([[0.5, 0.1], [0.2, 0.7]], threshold=0.6) == 0.25


def test_first_token_norm_ratio_residual_and_values():
    # residual [s=4, b=2, d=2]: sample 0 norms 10, 1, 2, 3 -> median 2.5 -> 4.0;
    # sample 1 norms 1, 1, 1, 1 -> 1.0. Mean 2.5.
    x = torch.zeros(4, 2, 2, dtype=torch.float64)
    x[:, 0, 0] = torch.tensor([6.0, 1.0, 2.0, 3.0])
    x[0, 0, 1] = 8.0  # |(6, 8)| = 10
    x[:, 1, 1] = 1.0
    assert first_token_norm_ratio(x, token_dim=0) == pytest.approx(2.5, abs=1e-12)
    # the same in [b, s, d]
    assert first_token_norm_ratio(x.transpose(0, 1), token_dim=1) == pytest.approx(2.5, abs=1e-12)
    # values [s=3, b=1, h=2, d=1]: head 0 |v| = 0.1, 1, 2 -> median 1 -> 0.1; head 1 = 3, 3, 3 -> 1
    v = torch.tensor([[0.1, 3.0], [1.0, 3.0], [2.0, -3.0]], dtype=torch.float64).reshape(3, 1, 2, 1)
    assert first_token_norm_ratio(v, token_dim=0) == pytest.approx((0.1 + 1.0) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="feature"):
        first_token_norm_ratio(x, token_dim=2)


def test_masked_mean():
    v = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    assert masked_mean(v, torch.tensor([[True, False], [True, True]])) == pytest.approx(14 / 3)
    assert math.isnan(masked_mean(v, torch.zeros(2, 2, dtype=torch.bool)))


# ---- what a per-tensor quantizer sees (issue 21): MA, RI, first-token norm, max|x| / RMS -------------
def hidden_by_hand():
    """[s=4, b=2, d=2]. Sample 0: t0 = (6, -8), t1 = (1, 0), t2 = (2, 0), t3 = (0.5, 1): |x| values
    6, 8, 1, 0, 2, 0, 0.5, 1 -> sorted 0, 0, 0.5, 1, 1, 2, 6, 8 -> median (1 + 1) / 2 = 1; first
    token's top channel 8; largest later value 2; ||x_0|| = 10. Sample 1: every value 1 ->
    median 1, top 1, later max 1, ||x_0|| = sqrt(2)."""
    x = torch.ones(4, 2, 2, dtype=torch.float64)
    x[:, 0, :] = torch.tensor([[6.0, -8.0], [1.0, 0.0], [2.0, 0.0], [0.5, 1.0]], dtype=torch.float64)
    return x


def test_massive_activation_ratio_by_hand():
    from megatron_outeff.metrics import massive_activation_ratio

    x = hidden_by_hand()
    assert massive_activation_ratio(x, token_dim=0) == pytest.approx((8.0 / 1.0 + 1.0) / 2, abs=1e-12)
    assert massive_activation_ratio(x.transpose(0, 1), token_dim=1) == pytest.approx(4.5, abs=1e-12)  # [b, s, d]
    # odd count: sample 0 alone over 3 tokens: 6, 8, 1, 0, 2, 0 -> sorted 0, 0, 1, 2, 6, 8 -> median 1.5
    assert massive_activation_ratio(x[:3, :1], token_dim=0) == pytest.approx(8.0 / 1.5, abs=1e-12)
    with pytest.raises(ValueError, match="feature"):
        massive_activation_ratio(x, token_dim=2)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        massive_activation_ratio(x[:1], token_dim=0)


def test_range_inflation_by_hand():
    from megatron_outeff.metrics import range_inflation

    x = hidden_by_hand()
    assert range_inflation(x, token_dim=0) == pytest.approx((8.0 / 2.0 + 1.0) / 2, abs=1e-12)
    # the first token is not the largest: RI < 1 (a later token sets the range)
    y = x.clone()
    y[2, 0, 1] = -16.0
    assert range_inflation(y[:, :1], token_dim=0) == pytest.approx(0.5, abs=1e-12)


def test_first_token_norm_and_absmax_over_rms_by_hand():
    from megatron_outeff.metrics import absmax_over_rms, first_token_norm

    x = hidden_by_hand()
    assert first_token_norm(x, token_dim=0) == pytest.approx((10.0 + math.sqrt(2.0)) / 2, abs=1e-12)
    assert absmax_over_rms(torch.tensor([3.0, -4.0])) == pytest.approx(4.0 / math.sqrt(12.5), abs=1e-7)
    # sample 0's 8 values: sum of squares 36 + 64 + 1 + 4 + 0.25 + 1 = 106.25, sample 1: 8 -> 114.25 / 16
    assert absmax_over_rms(x) == pytest.approx(8.0 / math.sqrt(114.25 / 16), abs=1e-12)
    assert absmax_over_rms(torch.zeros(3)) == 0.0


def test_collector_absmax_over_rms_is_the_whole_tensor_over_batches():
    """Per component over every batch seen (= of the concatenated tensor), and the largest one named."""
    from megatron_outeff.metrics import OutlierCollector, absmax_over_rms

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Identity(), torch.nn.Identity()

        def forward(self, x):
            return self.b(self.a(x) * torch.tensor([1.0, 1.0, 1.0, 20.0]))

    model = Two()
    coll = OutlierCollector({"l0.layer": model.a, "l0.fc2": model.b})
    batches = [torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with coll:
        for x in batches:
            model(x)
    s = coll.summary()
    whole = torch.cat(batches)
    assert s["components"]["l0.layer"]["absmax_over_rms"] == pytest.approx(absmax_over_rms(whole), rel=1e-12)
    scaled = whole * torch.tensor([1.0, 1.0, 1.0, 20.0])
    assert s["components"]["l0.fc2"]["absmax_over_rms"] == pytest.approx(absmax_over_rms(scaled), rel=1e-6)
    assert s["max_absmax_over_rms_component"] == max(
        ("l0.layer", "l0.fc2"), key=lambda n: s["components"][n]["absmax_over_rms"]
    )
    assert s["max_absmax_over_rms"] == max(c["absmax_over_rms"] for c in s["components"].values())
