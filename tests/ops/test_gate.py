"""The per-head gate (megatron_outeff/ops/gate.py) against its definition written out per head in float64."""
import math

import pytest
import torch

from megatron_outeff.ops.gate import gate_initial_value, gate_parameter_shapes, head_gate

H, D_HEAD = 4, 8
D_MODEL = H * D_HEAD


def params(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in gate_parameter_shapes(kind, H, D_HEAD, D_MODEL).items()}


def by_hand(x, kind, p):
    """g[..., h] = sigmoid(G_h(x_h)), one head at a time (module docstring of ops/gate.py)."""
    cols = []
    for h in range(H):
        xh = x[..., h * D_HEAD:(h + 1) * D_HEAD]
        if kind == "linear":
            z = xh @ p["weight"][h] + p["bias"][h]
        elif kind == "mlp":
            z = torch.relu(xh @ p["fc1_weight"][h].T + p["fc1_bias"][h]) @ p["fc2_weight"][h] + p["fc2_bias"][h]
        else:
            z = x @ p["weight"][h] + p["bias"][h]
        cols.append(torch.sigmoid(z))
    return torch.stack(cols, -1)


@pytest.mark.parametrize("kind", ["linear", "mlp", "shared_linear"])
def test_gate_equals_definition(kind):
    p = params(kind)
    x = torch.randn(3, 5, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = head_gate(x, kind, p)
    assert g.shape == (3, 5, H) and g.dtype == torch.float64
    # float64 throughout: the two differ by the summation order of <= d_model products only
    torch.testing.assert_close(g, by_hand(x, kind, p), atol=1e-12, rtol=0)
    # low-precision inputs: products in their dtype, the sigmoid (and the result) in float32
    assert head_gate(x.bfloat16(), kind, p).dtype == torch.float32


def test_a_ranks_heads_are_a_slice():
    """Under tensor parallelism a rank holds heads [2, 4) and reads their slices of the input."""
    p = params("mlp")
    x = torch.randn(2, 3, D_MODEL, dtype=torch.float64)
    half = {n: t[2:] for n, t in p.items()}
    torch.testing.assert_close(head_gate(x[..., 2 * D_HEAD:], "mlp", half), head_gate(x, "mlp", p)[..., 2:])


def test_shapes_and_initial_values():
    assert gate_parameter_shapes("linear", 4, 8, 32) == {"weight": (4, 8), "bias": (4,)}
    assert gate_parameter_shapes("shared_linear", 4, 8, 48) == {"weight": (4, 48), "bias": (4,)}
    assert gate_parameter_shapes("mlp", 4, 8, 32) == {"fc1_weight": (4, 2, 8), "fc1_bias": (4, 2), "fc2_weight": (4, 2),
                                                     "fc2_bias": (4,)}
    assert gate_initial_value("bias", 0.25) == gate_initial_value("fc2_bias", 0.25) == pytest.approx(math.log(1 / 3))
    assert gate_initial_value("fc1_bias", 0.25) == 0.0 and gate_initial_value("weight", 0.25) is None
    # a gate with zero weights opens exactly to gate_init_prob
    p = {n: torch.zeros(s) if gate_initial_value(n, 0.3) is None else torch.full(s, gate_initial_value(n, 0.3))
         for n, s in gate_parameter_shapes("mlp", H, D_HEAD, D_MODEL).items()}
    torch.testing.assert_close(head_gate(torch.randn(2, D_MODEL), "mlp", p), torch.full((2, H), 0.3))


@pytest.mark.parametrize("args,needle", [
    (("conv", 4, 8, 32), "gate='conv'"),
    (("linear", 4, 8, 48), "use gate='shared_linear'"),
    (("mlp", 4, 2, 8), "head_dim=2"),
])
def test_bad_shapes_are_one_line_errors(args, needle):
    with pytest.raises(ValueError, match=needle) as e:
        gate_parameter_shapes(*args)
    assert "\n" not in str(e.value)
