"""The training probe's quantizer-facing metrics (issue 21) in TensorBoard, from the single-process
oracle run (conftest.py: outlier probe every 2 steps), checked against their definitions: E is the
largest first-token norm ratio minus 1, MA / RI the largest per-layer values, the named maximum of
max|x| / RMS the largest per-component value; the first token's norms per source exist per layer."""

import pytest
from train_testlib import tensorboard_scalars


def test_quantizer_metrics_in_tensorboard(oracle):
    scalars = tensorboard_scalars(oracle["tensorboard_dir"])
    steps = {tag: [s for s, _ in events] for tag, events in scalars.items()}
    for tag in (
        "outliers/max_massive_activation",
        "outliers/max_range_inflation",
        "outliers/first_token_excess_norm",
        "outliers/max_absmax_over_rms",
        "outliers/embedding/first_token_norm",
    ):
        assert steps[tag] == [2, 4], tag
    for i in (0, 1):
        for tag in (
            f"outliers/layer{i}/layer/massive_activation",
            f"outliers/layer{i}/layer/range_inflation",
            f"outliers/layer{i}/attn_out/first_token_norm",
            f"outliers/layer{i}/fc2/first_token_norm",
            f"outliers/layer{i}/layer/first_token_norm",
            f"outliers/layer{i}/fc2/absmax_over_rms",
        ):
            assert steps[tag] == [2, 4], tag
    for k in range(2):

        def at(tag, k=k):
            return scalars[tag][k][1]

        assert at("outliers/first_token_excess_norm") == pytest.approx(
            at("outliers/max_first_token_norm_ratio") - 1, abs=1e-6
        )
        assert at("outliers/max_massive_activation") == max(
            at(f"outliers/layer{i}/layer/massive_activation") for i in (0, 1)
        )
        assert at("outliers/max_range_inflation") == max(at(f"outliers/layer{i}/layer/range_inflation") for i in (0, 1))
        per_component = [
            v[k][1]
            for t, v in scalars.items()
            if t.endswith("/absmax_over_rms") and t != "outliers/max_absmax_over_rms"
        ]
        assert len(per_component) == 11 and at("outliers/max_absmax_over_rms") == max(per_component)
        assert at("outliers/max_massive_activation") > 1.0 and at("outliers/embedding/first_token_norm") > 0
