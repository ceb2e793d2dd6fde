"""The gates (megatron_outeff/ops/gate.py): the per-head gate against its definition written out per head in
float64; the elementwise gate in ``outeff_attention`` (every impl, every softmax variant, clipping) against a
float64 definition of gated attention."""

import math

import pytest
import torch

from megatron_outeff.ops import outeff_attention
from megatron_outeff.ops.gate import head_gate
from megatron_outeff.ops.variants import AttentionVariantConfig, variant_tensors

H, D_HEAD = 4, 8
D_MODEL = H * D_HEAD


def shapes(kind, heads=H, d_head=D_HEAD, hidden=D_MODEL, **fields):
    """{name: shape} of a ``kind`` gate's parameters, as the variant's tensor description gives them."""
    tensors = variant_tensors(
        AttentionVariantConfig(gate=kind, **fields), num_heads=heads, head_dim=d_head, hidden_size=hidden
    )
    return {t.name: t.shape for t in tensors}


def params(kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes(kind).items()}


def by_hand(x, kind, p):
    """g[..., h] = sigmoid(G_h(x_h)), one head at a time (module docstring of ops/gate.py)."""
    cols = []
    for h in range(H):
        xh = x[..., h * D_HEAD : (h + 1) * D_HEAD]
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
    torch.testing.assert_close(head_gate(x[..., 2 * D_HEAD :], "mlp", half), head_gate(x, "mlp", p)[..., 2:])


def test_shapes_and_initial_values():
    assert shapes("linear", 4, 8, 32) == {"weight": (4, 8), "bias": (4,)}
    assert shapes("shared_linear", 4, 8, 48) == {"weight": (4, 48), "bias": (4,)}
    assert shapes("mlp", 4, 8, 32) == {
        "fc1_weight": (4, 2, 8),
        "fc1_bias": (4, 2),
        "fc2_weight": (4, 2),
        "fc2_bias": (4,),
    }
    init = {
        t.name: t.init
        for t in variant_tensors(
            AttentionVariantConfig(gate="mlp", gate_init_prob=0.25), num_heads=H, head_dim=D_HEAD, hidden_size=D_MODEL
        )
    }
    assert init["fc2_bias"] == pytest.approx(math.log(1 / 3)) and init["fc1_bias"] == 0.0
    assert init["fc1_weight"] is None and init["fc2_weight"] is None
    # a gate with zero weights opens exactly to gate_init_prob
    p = {
        t.name: torch.zeros(t.shape) if t.init is None else torch.full(t.shape, t.init)
        for t in variant_tensors(
            AttentionVariantConfig(gate="mlp", gate_init_prob=0.3), num_heads=H, head_dim=D_HEAD, hidden_size=D_MODEL
        )
    }
    torch.testing.assert_close(head_gate(torch.randn(2, D_MODEL), "mlp", p), torch.full((2, H), 0.3))


@pytest.mark.parametrize(
    "args,needle", [(("linear", 4, 8, 48), "use gate='shared_linear'"), (("mlp", 4, 2, 8), "head_dim=2")]
)
def test_bad_shapes_are_one_line_errors(args, needle):
    with pytest.raises(ValueError, match=needle) as e:
        shapes(*args)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kind,params_,needle",
    [
        ("conv", {}, "gate='conv'"),
        ("linear", {"weight": torch.zeros(H, D_HEAD)}, r"parameters \['weight'\]: expected \['bias', 'weight'\]"),
        ("linear", {"weight": torch.zeros(H, D_HEAD), "bias": torch.zeros(H), "fc9": torch.zeros(1)}, "'fc9'"),
    ],
)
def test_bad_gate_arguments_are_one_line_errors(kind, params_, needle):
    with pytest.raises(ValueError, match=needle) as e:
        head_gate(torch.zeros(2, D_MODEL), kind, params_)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ the elementwise gate in outeff_attention
def elementwise_oracle(q, k, v, gate, softmax, n, offset, clip, causal):
    """float64 definition: softmax over [scores, a_h] (the sink column dropped), clip, P V, times the gate per
    head and channel (Qiu et al. 2025; field notes section 1 and 6)."""
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    kt, vt = (t.repeat_interleave(h // h_kv, dim=2).transpose(1, 2) for t in (k, v))
    s = q.transpose(1, 2) @ kt.transpose(-1, -2) / math.sqrt(d)
    if causal:
        s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq).logical_not(), float("-inf"))
    a = {
        "vanilla": None,
        "softmax1": torch.zeros(h, dtype=s.dtype),
        "learnable": offset,
        # the ops hold a constant sink logit in float32 (variants.resolve_sink): log n rounded to it
        "softmax_n": torch.full((h,), math.log(n), dtype=torch.float32).to(s.dtype),
    }[softmax]
    if a is None:
        p = torch.softmax(s, dim=-1)
    else:
        p = torch.softmax(torch.cat([s, a.view(1, h, 1, 1).expand(b, h, sq, 1)], -1), dim=-1)[..., :-1]
    if clip is not None:
        gamma, zeta = clip
        p = torch.clamp((zeta - gamma) * p + gamma, 0, 1)
    return (p @ vt).transpose(1, 2) * gate


ELEMENTWISE_CASES = [
    (sm, clip) for sm in ("vanilla", "softmax1", "softmax_n", "learnable") for clip in (None, (-0.05, 1.0))
]


def _elementwise_inputs(dtype, seed=0, b=2, sq=8, sk=8, h=4, h_kv=2, d=32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    leaves = {
        "q": torch.randn(b, sq, h, d, generator=g),
        "k": torch.randn(b, sk, h_kv, d, generator=g),
        "v": torch.randn(b, sk, h_kv, d, generator=g),
        "gate": torch.rand(b, sq, h, d, generator=g) * 0.98 + 0.01,
        "offset": torch.tensor([0.7, -1.3, 8.0, -8.0]),
    }
    dout = torch.randn(b, sq, h, d, generator=g).to(device)
    return {n: t.to(device=device, dtype=dtype) for n, t in leaves.items()}, dout


def _run_elementwise(leaves, dout, impl, softmax, clip):
    xs = {n: t.clone().requires_grad_(True) for n, t in leaves.items()}
    out = outeff_attention(
        xs["q"],
        xs["k"],
        xs["v"],
        softmax=softmax,
        n=2.5,
        clip=clip,
        gate=xs["gate"],
        causal=True,
        offset=xs["offset"] if softmax == "learnable" else None,
        impl=impl,
    )
    out.backward(dout.to(out.dtype))
    grads = {n: t.grad for n, t in xs.items() if t.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("softmax,clip", ELEMENTWISE_CASES)
@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_elementwise_gate_fp64_against_definition(impl, softmax, clip):
    """gate [b, sq, h, d] with every softmax variant and clipping: output and every gradient (q, k, v, gate,
    offset) against the float64 definition, fp64 inputs (rounding ~1e-15; bound 1e-10 as the CPU-path tests)."""
    leaves, dout = _elementwise_inputs(torch.float64)
    out, grads = _run_elementwise(leaves, dout.double(), impl, softmax, clip)
    xs = {n: t.clone().requires_grad_(True) for n, t in leaves.items()}
    ref = elementwise_oracle(xs["q"], xs["k"], xs["v"], xs["gate"], softmax, 2.5, xs["offset"], clip, True)
    ref.backward(dout.double())
    torch.testing.assert_close(out, ref.detach(), atol=1e-10, rtol=1e-10)
    for name, g in grads.items():
        torch.testing.assert_close(g, xs[name].grad, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")
    assert set(grads) == {"q", "k", "v", "gate"} | ({"offset"} if softmax == "learnable" else set())


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("impl", ["triton", "rowwise"])
@pytest.mark.parametrize("softmax,clip", [("softmax1", None), ("learnable", (-0.05, 1.0))])
def test_elementwise_gate_kernels_match_the_reference(impl, softmax, clip):
    """The Triton paths (compiled on CUDA, the interpreter on CPU) with an elementwise gate: the same
    post-multiply as the reference, float32, at the kernel tests' float32 tolerance (tests/ops/attention_cases.py
    TOL under the interpreter; compiled kernels take fp16 dot operands: test_flash_attention.py's GPU_TOL)."""
    from attention_cases import TOL

    tol = TOL[torch.float32] if DEVICE == "cpu" else dict(atol=1e-4, rtol=1e-3)
    leaves, dout = _elementwise_inputs(torch.float32, seed=1, device=DEVICE)
    out, grads = _run_elementwise(leaves, dout, impl, softmax, clip)
    ref, ref_grads = _run_elementwise(leaves, dout, "torch", softmax, clip)
    torch.testing.assert_close(out, ref, **tol)
    assert set(grads) == set(ref_grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_elementwise_gate_rounds_once_in_low_precision(dtype):
    """fp16 / bf16 output: the gate multiplies in fp32 and the product rounds once to the output's dtype
    (megatron-core's _apply_output_gate), so it equals round(fp32(ungated) * gate) exactly."""
    leaves, _ = _elementwise_inputs(dtype, seed=2)
    gate = leaves["gate"].float()
    ungated = outeff_attention(leaves["q"], leaves["k"], leaves["v"], softmax="softmax1", causal=True)
    gated = outeff_attention(leaves["q"], leaves["k"], leaves["v"], softmax="softmax1", causal=True, gate=gate)
    assert gated.dtype == dtype
    assert torch.equal(gated, (ungated.float() * gate).to(dtype))


def test_gate_shape_errors_name_both_forms():
    q = torch.zeros(1, 3, 2, 4)
    with pytest.raises(
        ValueError,
        match=r"gate shape \(1, 3, 2, 5\): expected \(1, 3, 2\) = \[batch, sq, heads\] "
        r"\(per head\) or \(1, 3, 2, 4\) \(elementwise\)",
    ) as e:
        outeff_attention(q, q, q, gate=torch.zeros(1, 3, 2, 5))
    assert "\n" not in str(e.value)
