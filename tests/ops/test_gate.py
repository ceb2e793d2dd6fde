"""The per-head gate (megatron_outeff/ops/gate.py) against its definition written out per head in float64."""
import math

import pytest
import torch

from megatron_outeff.ops.gate import head_gate
from megatron_outeff.ops.variants import AttentionVariantConfig, variant_tensors

H, D_HEAD = 4, 8
D_MODEL = H * D_HEAD


def shapes(kind, heads=H, d_head=D_HEAD, hidden=D_MODEL, **fields):
    """{name: shape} of a ``kind`` gate's parameters, as the variant's tensor description gives them."""
    tensors = variant_tensors(AttentionVariantConfig(gate=kind, **fields), num_heads=heads, head_dim=d_head,
                              hidden_size=hidden)
    return {t.name: t.shape for t in tensors}


def params(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes(kind).items()}


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
    assert shapes("linear", 4, 8, 32) == {"weight": (4, 8), "bias": (4,)}
    assert shapes("shared_linear", 4, 8, 48) == {"weight": (4, 48), "bias": (4,)}
    assert shapes("mlp", 4, 8, 32) == {"fc1_weight": (4, 2, 8), "fc1_bias": (4, 2), "fc2_weight": (4, 2), "fc2_bias": (4,)}
    init = {t.name: t.init for t in variant_tensors(AttentionVariantConfig(gate="mlp", gate_init_prob=0.25),
                                                    num_heads=H, head_dim=D_HEAD, hidden_size=D_MODEL)}
    assert init["fc2_bias"] == pytest.approx(math.log(1 / 3)) and init["fc1_bias"] == 0.0
    assert init["fc1_weight"] is None and init["fc2_weight"] is None
    # a gate with zero weights opens exactly to gate_init_prob
    p = {t.name: torch.zeros(t.shape) if t.init is None else torch.full(t.shape, t.init)
         for t in variant_tensors(AttentionVariantConfig(gate="mlp", gate_init_prob=0.3), num_heads=H, head_dim=D_HEAD,
                                  hidden_size=D_MODEL)}
    torch.testing.assert_close(head_gate(torch.randn(2, D_MODEL), "mlp", p), torch.full((2, H), 0.3))


@pytest.mark.parametrize("args,needle", [
    (("linear", 4, 8, 48), "use gate='shared_linear'"),
    (("mlp", 4, 2, 8), "head_dim=2"),
])
def test_bad_shapes_are_one_line_errors(args, needle):
    with pytest.raises(ValueError, match=needle) as e:
        shapes(*args)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind,params_,needle", [
    ("conv", {}, "gate='conv'"),
    ("linear", {"weight": torch.zeros(H, D_HEAD)}, r"parameters \['weight'\]: expected \['bias', 'weight'\]"),
    ("linear", {"weight": torch.zeros(H, D_HEAD), "bias": torch.zeros(H), "fc9": torch.zeros(1)}, "'fc9'"),
])
def test_bad_gate_arguments_are_one_line_errors(kind, params_, needle):
    with pytest.raises(ValueError, match=needle) as e:
        head_gate(torch.zeros(2, D_MODEL), kind, params_)
    assert "\n" not in str(e.value)
