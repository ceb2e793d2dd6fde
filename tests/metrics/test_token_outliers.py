"""Token-wise outlier metrics against values computed by hand on constructed attention maps and
hidden states."""
import math

import pytest
import torch

from megatron_outeff.metrics import (first_token_mass_per_head, first_token_norm_ratio, masked_mean,
                                     sink_head_share)


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
