import math

import pytest
import torch

from megatron_outeff.errors import OutEffError
from megatron_outeff.utils.finite import count_nonfinite, require_finite


def test_counts_nan_and_both_infinities():
    t = torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0])
    assert count_nonfinite(t) == 3
    assert count_nonfinite(torch.arange(4)) == 0
    assert count_nonfinite(math.nan) == 1 and count_nonfinite(2.5) == 0


def test_require_finite_names_the_value():
    require_finite(torch.ones(3), "w")
    require_finite(1.0, "loss")
    with pytest.raises(OutEffError, match=r"^w: 1 non-finite value\(s\) \(nan/inf\) of 3; expected finite values$"):
        require_finite(torch.tensor([1.0, float("inf"), 2.0]), "w")
    with pytest.raises(OutEffError, match=r"^loss at iteration 3 is nan; expected a finite value$"):
        require_finite(float("nan"), "loss at iteration 3")
