"""The PyTorch reference (CPU path and oracle of the kernels) against independent oracles.

Oracles: torch SDPA (vanilla), the zero-key/zero-value construction for integer n (softmax_n is
vanilla attention over n extra keys with logit 0 and value 0), megatron-core's own SoftmaxOne
(off-by-one / learnable), a float64 concatenated-sink softmax, and float64 gradcheck.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_bound, attention_bound, rounding_bound

from megatron_outeff.ops import Clip, outeff_attention, outeff_attention_probs, outeff_softmax_reference

torch.manual_seed(0)


def rand_qkv(b=2, sq=7, sk=7, h=4, h_kv=4, d=8, dtype=torch.float32, scale=1.0):
    q = (torch.randn(b, sq, h, d) * scale).to(dtype)
    k = torch.randn(b, sk, h_kv, d).to(dtype)
    v = torch.randn(b, sk, h_kv, d).to(dtype)
    return q, k, v


def _variant(softmax, n, offset):
    """The variant's keyword arguments: n (read by softmax_n only) and the offset, passed for "learnable" only."""
    return dict(softmax=softmax, n=n, offset=offset if softmax == "learnable" else None)


def allowed_mask(b, sq, sk, causal, kpm):
    """Bool [b, 1, sq, sk], True = may attend. Built independently of the code under test."""
    allowed = torch.ones(b, 1, sq, sk, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    if kpm is not None:
        allowed &= kpm[:, None, None, :]
    return allowed


def sdpa(q, k, v, allowed, scale):
    qt, kt, vt = (t.transpose(1, 2).double() for t in (q, k, v))
    h, h_kv = qt.shape[1], kt.shape[1]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, scale=scale, enable_gqa=h != h_kv)
    return out.transpose(1, 2)


def sink_softmax_oracle(x, a):
    """megatron-style: softmax over [x, a] with the sink column dropped, float64."""
    a = a.double().view(1, -1, 1, 1).expand(x.shape[0], -1, x.shape[2], 1)
    return torch.softmax(torch.cat([x.double(), a], dim=-1), dim=-1)[..., :-1]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(7, 7), (5, 9), (1, 12)])
@pytest.mark.parametrize("h_kv", [4, 2, 1])
def test_vanilla_matches_sdpa(causal, sq, sk, h_kv):
    q, k, v = rand_qkv(sq=sq, sk=sk, h_kv=h_kv)
    kpm = torch.ones(2, sk, dtype=torch.bool)
    kpm[1, :2] = False  # pad the first keys of batch 1 (never the last: rows stay non-empty)
    out = outeff_attention(q, k, v, softmax="vanilla", causal=causal, key_padding_mask=kpm)
    ref = sdpa(q, k, v, allowed_mask(2, sq, sk, causal, kpm), 1 / math.sqrt(8))
    assert_close_bound(out, ref, attention_bound(q, k, v, 1 / math.sqrt(8)))  # float32 vs float64


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_n_equals_zero_key_padding(n, causal):
    """softmax_n == vanilla attention with n extra keys of logit 0 (zero key) and zero value."""
    b, sq, sk, h, d = 2, 6, 6, 4, 8
    q, k, v = rand_qkv(b, sq, sk, h, h, d)
    kpm = torch.ones(b, sk, dtype=torch.bool)
    kpm[0, :] = False  # a fully padded batch element: only the zero keys remain
    name = "softmax1" if n == 1 else "softmax_n"
    out = outeff_attention(q, k, v, softmax=name, n=n, causal=causal, key_padding_mask=kpm)
    k_ext = torch.cat([k, torch.zeros(b, n, h, d)], dim=1)
    v_ext = torch.cat([v, torch.zeros(b, n, h, d)], dim=1)
    allowed = torch.cat([allowed_mask(b, sq, sk, causal, kpm), torch.ones(b, 1, sq, n, dtype=torch.bool)], dim=-1)
    ref = sdpa(q, k_ext, v_ext, allowed, 1 / math.sqrt(d))
    assert_close_bound(out, ref, attention_bound(q, k_ext, v_ext, 1 / math.sqrt(d)))  # float32 vs float64
    assert out[0].abs().max() == 0  # fully padded rows: exactly zero


@pytest.mark.parametrize("softmax_type", ["off-by-one", "learnable"])
def test_softmax_matches_megatron_softmax_one(softmax_type):
    from megatron.core.fusions.fused_softmax import SoftmaxOne

    b, h, sq, sk = 2, 4, 5, 11
    x = torch.randn(b, h, sq, sk, dtype=torch.float64) * 3
    if softmax_type == "off-by-one":
        offset = torch.zeros(h, dtype=torch.float64)
    else:
        offset = torch.tensor([-8.0, -1.0, 2.0, 8.0], dtype=torch.float64)
    mask = torch.rand(b, 1, sq, sk) < 0.3
    mask[..., 0] = False  # keep every row non-empty (megatron fills masked logits with -10000)
    off_ours = offset.clone().requires_grad_(True)
    off_meg = offset.clone().requires_grad_(True)
    x_ours, x_meg = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = outeff_softmax_reference(x_ours, sink=off_ours, mask=mask).double()
    theirs = SoftmaxOne(-1, off_meg)(x_meg.masked_fill(mask, -10000.0))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)  # ours runs in fp32
    w = torch.randn_like(ours)
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_meg.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(off_ours.grad, off_meg.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sk", [1, 3, 16, 700])
@pytest.mark.parametrize("offset", [0.0, 8.0, -8.0, 30.0])
def test_sink_softmax_short_long_rows_and_large_offsets(sk, offset):
    x = torch.randn(2, 3, 4, sk, dtype=torch.float64) * 2
    a = torch.full((3,), offset, dtype=torch.float64)
    ours = outeff_softmax_reference(x, sink=a.float()).double()
    torch.testing.assert_close(ours, sink_softmax_oracle(x, a), atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("magnitude", [1e4, -1e4])
def test_extreme_logits_stay_finite(magnitude):
    x = torch.randn(1, 2, 3, 8, dtype=torch.float64) + magnitude
    x[..., 0] = magnitude + 3.0
    x = x.float().double()  # the reference computes in fp32: give the oracle the same rounded logits
    for sink in (None, torch.zeros(2)):
        p = outeff_softmax_reference(x, sink=sink).double()
        ref = torch.softmax(x, -1) if sink is None else sink_softmax_oracle(x, torch.zeros(2))
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p, ref, atol=1e-6, rtol=1e-5)
    if magnitude < 0:  # all logits ~ -1e4 below the sink: Softmax_1 puts all mass on the sink
        assert outeff_softmax_reference(x, sink=torch.zeros(2)).abs().max() == 0


@pytest.mark.parametrize("softmax", ["vanilla", "softmax1", "learnable"])
@pytest.mark.parametrize("clipped", [False, True])
def test_fully_masked_rows_give_zero_output_and_zero_grad(softmax, clipped):
    q, k, v = rand_qkv(b=2, sq=4, sk=5, h=2, h_kv=2, d=8)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    offset = torch.tensor([0.5, -2.0], requires_grad=True) if softmax == "learnable" else None
    kpm = torch.ones(2, 5, dtype=torch.bool)
    kpm[1] = False  # batch element 1: every key is padding
    out = outeff_attention(
        q, k, v, softmax=softmax, offset=offset, key_padding_mask=kpm, clip=(-0.03, 1.0) if clipped else None
    )
    out.square().sum().backward()
    assert out[1].abs().max() == 0
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert q.grad[1].abs().max() == 0 and k.grad[1].abs().max() == 0 and v.grad[1].abs().max() == 0
    if offset is not None:
        assert torch.isfinite(offset.grad).all()


@pytest.mark.parametrize("softmax", ["vanilla", "softmax1", "softmax_n", "learnable"])
def test_attention_probs_match_concatenated_sink_softmax(softmax):
    """outeff_attention_probs (the monitoring probe's source): causal + key padding + a dense mask, GQA,
    against the float64 concatenated-sink softmax of the masked scores; the clip never applies."""
    b, sq, sk, h = 2, 6, 9, 4
    q, k, _ = rand_qkv(b=b, sq=sq, sk=sk, h=h, h_kv=2)
    kpm = torch.ones(b, sk, dtype=torch.bool)
    kpm[1, :2] = False
    dense = torch.rand(b, 1, sq, sk, generator=torch.Generator().manual_seed(4)) < 0.3
    dense[..., 3] = False  # the first key every row sees (causal, batch 1's first two padded)
    offset = torch.tensor([0.5, -1.0, 2.0, 8.0])
    sink = {
        "vanilla": None,
        "softmax1": torch.zeros(h),
        "softmax_n": torch.full((h,), math.log(2.5)),
        "learnable": offset,
    }[softmax]
    probs = outeff_attention_probs(
        q, k, **_variant(softmax, 2.5, offset), causal=True, key_padding_mask=kpm, mask=dense
    )
    allowed = allowed_mask(b, sq, sk, True, kpm) & ~dense
    kt = k.double().repeat_interleave(2, dim=2)
    x = (q.double().transpose(1, 2) @ kt.permute(0, 2, 3, 1)) / math.sqrt(8)
    x = x.masked_fill(~allowed, float("-inf"))
    oracle = torch.softmax(x, -1) if sink is None else sink_softmax_oracle(x, sink)
    assert probs.shape == (b, h, sq, sk) and probs.dtype == torch.float32
    # float32 probabilities (<= 1): a score's rounding error d eps S (S = max scale sum |q k|) moves p by
    # twice that relative (numerator and normaliser); the exponentials and the sum add (sk + 1) eps
    S = ((q.double().abs().transpose(1, 2) @ kt.abs().permute(0, 2, 3, 1)) / math.sqrt(8)).max().item()
    assert_close_bound(probs, oracle, rounding_bound(torch.float32, 1.0, int(2 * 8 * S) + sk + 2))
    if sink is not None:
        assert (oracle.sum(-1) < 1).all()


def test_clip_matches_formula_and_is_applied():
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    gamma, zeta = -0.1, 1.1
    p = torch.softmax(x, -1)
    expected = ((zeta - gamma) * p + gamma).clamp(0, 1)
    ours = outeff_softmax_reference(x, clip=Clip(gamma, zeta)).double()
    torch.testing.assert_close(ours, expected, atol=1e-7, rtol=1e-6)
    assert (ours == 0).any()  # small probabilities are clipped to exactly zero


def test_gate_multiplies_each_head_output():
    q, k, v = rand_qkv()
    gate = torch.rand(2, 7, 4)
    plain = outeff_attention(q, k, v, softmax="softmax1")
    gated = outeff_attention(q, k, v, softmax="softmax1", gate=gate)
    torch.testing.assert_close(gated, plain * gate[..., None])


def test_softmax1_differs_from_vanilla_on_short_rows():
    q, k, v = rand_qkv(sq=3, sk=3)
    a = outeff_attention(q, k, v, softmax="softmax1")
    b = outeff_attention(q, k, v, softmax="vanilla")
    assert (a - b).abs().max() > 1e-2


@pytest.mark.parametrize(
    "softmax,clip", [("softmax1", None), ("learnable", None), ("softmax_n", (-0.2, 1.2)), ("vanilla", (-0.05, 1.0))]
)
def test_gradcheck_float64(softmax, clip):
    b, sq, sk, h, h_kv, d = 1, 3, 4, 2, 1, 4
    q = torch.randn(b, sq, h, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, sk, h_kv, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, sk, h_kv, d, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(b, sq, h, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(h, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[True, True, False, True]])

    def f(q, k, v, gate, offset):
        return outeff_attention(
            q, k, v, **_variant(softmax, 2.0, offset), clip=clip, gate=gate, causal=True, key_padding_mask=kpm
        )

    assert torch.autograd.gradcheck(f, (q, k, v, gate, offset), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_use_fp32_math(dtype):
    q, k, v = rand_qkv(dtype=dtype, scale=40.0)  # logits in the hundreds: fp16 exp would overflow
    out = outeff_attention(q, k, v, softmax="softmax1", causal=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = outeff_attention(q.float(), k.float(), v.float(), softmax="softmax1", causal=True)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_dropout_zeroes_probabilities_and_rescales():
    torch.manual_seed(1)
    q, k, v = rand_qkv(b=1, sq=64, sk=64, h=2, h_kv=2, d=8)
    plain = outeff_attention(q, k, v)
    dropped = outeff_attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(plain, dropped)
    # E[dropout(p)] = p: averaging many draws approaches the undropped output
    mean = torch.stack([outeff_attention(q, k, v, dropout_p=0.5) for _ in range(400)]).mean(0)
    assert (mean - plain).abs().mean() < 0.05 * plain.abs().mean()


BAD = [
    (dict(q=torch.randn(2, 3, 4)), "q has rank 3"),
    (dict(k=torch.randn(2, 5, 3, 8), v=torch.randn(2, 5, 3, 8)), "kv heads 3"),
    (dict(softmax="softmax2"), "softmax='softmax2'"),
    (dict(softmax="learnable"), "offset=None"),
    (dict(softmax="learnable", offset=torch.zeros(3)), "offset shape (3,)"),
    (dict(offset=torch.zeros(4)), "offset given with softmax='softmax1'"),
    (dict(softmax="softmax_n", n=-1.0), "n=-1.0"),
    (dict(clip=(0.1, 1.0)), "gamma=0.1"),
    (dict(clip=(-0.1, 0.9)), "zeta=0.9"),
    (dict(clip="x"), "clip='x'"),
    (dict(gate=torch.rand(2, 7, 3)), "gate shape (2, 7, 3)"),
    (dict(key_padding_mask=torch.ones(2, 7)), "key_padding_mask dtype torch.float32"),
    (dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), "key_padding_mask shape (2, 6)"),
    (dict(mask=torch.ones(2, 1, 7, 7)), "mask dtype torch.float32"),
    (dict(mask=torch.ones(2, 1, 6, 7, dtype=torch.bool)), "mask shape (2, 1, 6, 7)"),
    (dict(mask=torch.ones(7, 7, dtype=torch.bool)), "mask shape (7, 7)"),
    (dict(k=torch.randn(2, 5, 4, 8).half(), v=torch.randn(2, 5, 4, 8).half()), "dtypes q=torch.float32"),
    (dict(impl="cuda"), "impl='cuda'"),
    (dict(dropout_p=1.0), "dropout_p=1.0"),
    (dict(scale=-1.0), "scale=-1.0"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_names_the_value(kwargs, message):
    q, k, v = rand_qkv()
    args = dict(q=q, k=k, v=v)
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        outeff_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = rand_qkv()
    with pytest.raises(ValueError, match="impl='triton' on device cpu"):
        outeff_attention(q, k, v, impl="triton")
