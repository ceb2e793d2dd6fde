"""The CPU paths against two oracles: ``impl="cpu"`` (megatron_outeff/ops/cpu_attention.py), i.e. torch's
fused CPU flash kernel with the sink (ops/sdpa_attention.py, what ``impl="auto"`` runs for unclipped
variants on CPU) and the lean materialised path for clipped ones. The same sink code on torch's CUDA
kernels is tested in test_sdpa_attention.py (emulated kernels, meta tensors) and test_sdpa_cuda.py (GPU).

1. A float64 oracle written here from the definition (field notes section 1): materialised scores,
   the sink as one extra column of logit a_h (value zero), torch.softmax, clip, P @ V, gate; gradients by
   autograd. fp64 inputs run the kernel in fp64, so the comparison is tight: atol = rtol = 1e-10
   (observed errors ~1e-15; the bound leaves room for summation order over a few hundred terms).
2. The PyTorch reference (``impl="torch"``) on fp32 copies of the very same inputs, for fp32 / fp16 /
   bf16 inputs; tolerances as the flash kernel's (tests/ops/test_flash_attention.py, README
   "Numerics"): fp32 atol 1e-5 rtol 1e-4, fp16 2e-3, bf16 1.6e-2 - the rounding of the results to
   the input dtype plus fp32 summation-order noise.
Fully masked rows are checked to be exactly zero (output and every gradient). Speed and memory are
measured by tools/bench_attention.py; here only the structure is checked: no tensor saved for the
backward is as large as a [sq, sk] score matrix.
"""

from __future__ import annotations

import math

import attention_cases
import pytest
import torch
from attention_cases import TOL, VARIANTS, assert_all_close, dout_for, run_attention

from megatron_outeff.ops import attention as attention_module
from megatron_outeff.ops import cpu_attention as cpu_attention_module
from megatron_outeff.ops import outeff_attention

FP64_TOL = dict(atol=1e-10, rtol=1e-10)


def make_inputs(
    b=2, sq=9, sk=9, h=4, h_kv=2, d=16, dtype=torch.float64, variant="softmax1", gate=True, pad=False, **kw
):
    """attention_cases.make_inputs at this file's defaults: GQA 4 -> 2, fp64, gated."""
    return attention_cases.make_inputs(b, sq, sk, h, h_kv, d, dtype=dtype, gate=gate, variant=variant, pad=pad, **kw)


def oracle_fp64(leaves, kw, dout, drop=None):
    """Definition in float64: softmax over [scores, a_h] (sink column dropped), P @ V, gate.
    drop: None or (keep mask [b, h, sq, sk], dropout_p): dropout of the (clipped) probabilities."""
    xs = {n: t.detach().double().clone().requires_grad_(True) for n, t in leaves.items()}
    q, k, v = xs["q"], xs["k"], xs["v"]
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    kt = k.repeat_interleave(h // h_kv, dim=2).transpose(1, 2)
    vt = v.repeat_interleave(h // h_kv, dim=2).transpose(1, 2)
    s = q.transpose(1, 2) @ kt.transpose(-1, -2) / math.sqrt(d)  # [b, h, sq, sk]
    allowed = torch.ones(b, 1, sq, sk, dtype=torch.bool)
    if kw.get("causal"):
        allowed &= torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)
    if kw.get("key_padding_mask") is not None:
        allowed &= kw["key_padding_mask"][:, None, None, :]
    if kw.get("mask") is not None:
        allowed = allowed & ~kw["mask"]
    s = s.masked_fill(~allowed, float("-inf"))
    softmax = kw["softmax"]
    if softmax == "vanilla":
        p = torch.softmax(s, dim=-1)
    else:
        a = {
            "softmax1": lambda: torch.zeros(h, dtype=torch.float64),
            # resolve_sink stores log(n) in fp32 (as every implementation uses it): same rounded value
            "softmax_n": lambda: torch.full((h,), math.log(kw["n"]), dtype=torch.float32).double(),
            "learnable": lambda: xs["offset"],
        }[softmax]()
        col = a.view(1, h, 1, 1).expand(b, h, sq, 1)
        p = torch.softmax(torch.cat([s, col], dim=-1), dim=-1)[..., :sk]
    if kw.get("clip") is not None:
        gamma, zeta = kw["clip"]
        p = torch.clamp((zeta - gamma) * p + gamma, 0.0, 1.0)
    if drop is not None:
        p = p * drop[0] / (1.0 - drop[1])
    out = (p @ vt).transpose(1, 2)
    if "gate" in xs:
        out = out * xs["gate"].unsqueeze(-1)
    out.backward(dout.double())
    return out.detach(), {n: t.grad for n, t in xs.items()}


def assert_match(out, grads, ref, ref_grads, tol, leaves, gate_extra=0.0):
    """gate_extra: added to the atol of the gate's gradient (see gate_rounding_bound)."""
    assert_all_close(out, grads, ref, ref_grads, leaves, tol, {"gate": tol["atol"] + gate_extra})


# ------------------------------------------------------------------------------------------------
# float64 oracle: every variant x mask x GQA, short and longer rows, offsets +-8
# ------------------------------------------------------------------------------------------------
MASKS = {
    "none": dict(sq=9, sk=9, causal=False, pad=False),
    "causal": dict(sq=9, sk=9, causal=True, pad=False),
    "causal_sq<sk": dict(sq=5, sk=11, causal=True, pad=False),
    "pad": dict(sq=9, sk=9, causal=False, pad=True),
    "causal_pad_sq>sk": dict(sq=11, sk=6, causal=True, pad=True),
}


# fully masked vanilla rows are a convention (zero), not a softmax: test_fully_masked_rows checks them
FP64_CASES = [(v, m) for v in VARIANTS for m in MASKS if not (v == "vanilla" and m == "causal_pad_sq>sk")]


@pytest.mark.parametrize("variant,mask", FP64_CASES, ids=[f"{v}-{m}" for v, m in FP64_CASES])
def test_fp64_against_definition(variant, mask):
    """GQA with 2 query heads per kv head; test_fp64_gqa covers 1 and 4."""
    check_fp64(variant, mask, h_kv=2)


@pytest.mark.parametrize("h_kv", [4, 1])
@pytest.mark.parametrize("variant", ["vanilla", "learnable"])
def test_fp64_gqa(variant, h_kv):
    check_fp64(variant, "causal_pad_sq>sk" if variant != "vanilla" else "causal_sq<sk", h_kv)


def check_fp64(variant, mask, h_kv):
    m = MASKS[mask]
    leaves, kw = make_inputs(sq=m["sq"], sk=m["sk"], h_kv=h_kv, variant=variant, pad=m["pad"])
    kw["causal"] = m["causal"]
    dout = dout_for(leaves)
    out, grads = run_attention(leaves, kw, "cpu", dout)
    ref, ref_grads = oracle_fp64(leaves, kw, dout)
    assert_match(out, grads, ref, ref_grads, FP64_TOL, leaves)


@pytest.mark.parametrize("sk", [1, 3, 300])
@pytest.mark.parametrize("variant", ["softmax1", "learnable", "vanilla"])
def test_fp64_short_and_long_rows(variant, sk):
    """Short rows are where the sink matters most; sk = 300 spans several of the kernel's key blocks."""
    leaves, kw = make_inputs(b=1, sq=7, sk=sk, variant=variant)
    dout = dout_for(leaves)
    out, grads = run_attention(leaves, kw, "cpu", dout)
    ref, ref_grads = oracle_fp64(leaves, kw, dout)
    assert_match(out, grads, ref, ref_grads, FP64_TOL, leaves)


# ------------------------------------------------------------------------------------------------
# low precision against the reference on fp32 copies
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mask", ["causal", "causal_pad_sq>sk", "pad"])
def test_against_reference(dtype, variant, mask):
    m = MASKS[mask]
    leaves, kw = make_inputs(sq=m["sq"], sk=m["sk"], variant=variant, pad=m["pad"], dtype=dtype, d=32)
    kw["causal"] = m["causal"]
    dout = dout_for(leaves)
    out, grads = run_attention(leaves, kw, "cpu", dout)
    assert out.dtype == dtype
    ref, ref_grads = run_attention(leaves, kw, "torch", dout.float(), upcast=True)
    assert_match(out, grads, ref, ref_grads, TOL[dtype], leaves, gate_extra=gate_rounding_bound(ref, leaves, dout))


def gate_rounding_bound(ref, leaves, dout):
    """The kernel returns the ungated output O already rounded to the input dtype (relative error eps/2
    per element); the gate's gradient rowsum(dO * O) sums d such errors: bound eps * max_row sum |dO||O|."""
    dtype = leaves["q"].dtype
    ungated = ref.float() / leaves["gate"].float().unsqueeze(-1)
    return torch.finfo(dtype).eps * (dout.float().abs() * ungated.abs()).sum(-1).max().item()


@pytest.mark.parametrize("variant", ["vanilla", "softmax1", "learnable"])
def test_fp32_long_rows_against_reference(variant):
    leaves, kw = make_inputs(b=1, sq=200, sk=200, h=2, h_kv=1, d=64, variant=variant, dtype=torch.float32)
    kw["causal"] = True
    dout = dout_for(leaves)
    out, grads = run_attention(leaves, kw, "cpu", dout)
    ref, ref_grads = run_attention(leaves, kw, "torch", dout)
    assert_match(out, grads, ref, ref_grads, TOL[torch.float32], leaves)


@pytest.mark.parametrize("magnitude", [1e4, -1e4])
@pytest.mark.parametrize("variant", ["vanilla", "softmax1", "learnable"])
def test_extreme_logits(variant, magnitude):
    """Logits around +-1e4 (fp64): the sigmoid rescale and logaddexp keep everything finite and exact.
    With -1e4 the sink dominates the normaliser (outputs ~ exp(-1e4) = 0), vanilla does not."""
    leaves, kw = make_inputs(b=1, sq=6, sk=10, h=4, h_kv=4, d=16, variant=variant)
    d = leaves["q"].shape[-1]
    u = torch.ones(d, dtype=torch.float64) / math.sqrt(d)
    leaves["k"] = (u * 10.0 + 0.01 * leaves["k"]).contiguous()
    leaves["q"] = (u * magnitude * math.sqrt(d) / 10.0 + 2.0 * leaves["q"]).contiguous()  # logits ~ magnitude +- O(10)
    logits = torch.einsum("bqhd,bkhd->bhqk", leaves["q"], leaves["k"]) / math.sqrt(d)
    assert logits.abs().min() > 0.9e4
    kw["causal"] = True
    dout = dout_for(leaves)
    out, grads = run_attention(leaves, kw, "cpu", dout)
    ref, ref_grads = oracle_fp64(leaves, kw, dout)
    # dS = P (dP - D) cancels in saturated rows; the rounding of D (~1e-16 * |O| |dO|) is multiplied by
    # |k| ~ 10 for dq and |q| ~ 1e3 for dk: scale the atol by the other operand's magnitude.
    for name, g in grads.items():
        scale = {"q": leaves["k"].abs().max().item(), "k": leaves["q"].abs().max().item()}.get(name, 1.0)
        torch.testing.assert_close(
            g, ref_grads[name], atol=1e-10 * scale, rtol=1e-8, msg=lambda m, n=name: f"grad {n}: {m}"
        )
    torch.testing.assert_close(out, ref, **FP64_TOL)


@pytest.mark.parametrize("clip", [None, (-0.1, 1.1)], ids=["noclip", "clip11"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fully_masked_rows(variant, dtype, clip):
    """Batch 0 has every key padded; causal with sq > sk leaves the first sq - sk queries of batch 1 with
    no key. Those rows: exactly zero output and gradients; the rest matches the reference."""
    b, sq, sk = 2, 12, 7
    leaves, kw = make_inputs(b=b, sq=sq, sk=sk, variant=variant, dtype=dtype)
    mask = torch.ones(b, sk, dtype=torch.bool)
    mask[0] = False
    mask[1, 0] = False
    kw.update(key_padding_mask=mask, causal=True, clip=clip)
    dout = dout_for(leaves)
    out, grads = run_attention(leaves, kw, "cpu", dout)
    ref, ref_grads = run_attention(
        leaves, kw, "torch", dout.float() if dtype != torch.float64 else dout, upcast=dtype != torch.float64
    )
    empty = sq - sk + 1  # batch 1: rows 0 .. sq - sk see only key 0, which is padded
    assert (out[0] == 0).all() and (out[1, :empty] == 0).all()
    assert (grads["q"][0] == 0).all() and (grads["q"][1, :empty] == 0).all()
    assert (grads["k"][0] == 0).all() and (grads["v"][0] == 0).all()
    assert (grads["gate"][0] == 0).all() and (grads["gate"][1, :empty] == 0).all()
    assert_match(out, grads, ref, ref_grads, FP64_TOL if dtype == torch.float64 else TOL[dtype], leaves)


# ------------------------------------------------------------------------------------------------
# dense masks (outeff_attention(mask=...): megatron's arbitrary attention_mask)
# ------------------------------------------------------------------------------------------------
def dense_mask(b, sq, sk, h=1, seed=2):
    """Bool [b, h, sq, sk], True = masked out: random holes (~40%); key 0 always visible."""
    m = torch.rand(b, h, sq, sk, generator=torch.Generator().manual_seed(seed)) < 0.4
    m[..., 0] = False
    return m


DENSE_CASES = [
    (v, c, i) for v in ("vanilla", "softmax_n2.5", "learnable") for c in (None, (-0.1, 1.1)) for i in ("cpu", "torch")
]


@pytest.mark.parametrize(
    "variant,clip,impl", DENSE_CASES, ids=[f"{v}-{'clip' if c else 'noclip'}-{i}" for v, c, i in DENSE_CASES]
)
def test_fp64_dense_mask_against_definition(variant, clip, impl):
    """A dense mask combined with causal and key padding (the oracle ANDs the allowed sets), GQA 2:1."""
    leaves, kw = make_inputs(sq=9, sk=11, variant=variant, pad=True)
    kw.update(causal=True, clip=clip, mask=dense_mask(2, 9, 11))
    dout = dout_for(leaves)
    out, grads = run_attention(leaves, kw, impl, dout)
    ref, ref_grads = oracle_fp64(leaves, kw, dout)
    assert_match(out, grads, ref, ref_grads, FP64_TOL, leaves)


@pytest.mark.parametrize("shape", ["per_head", "per_sample_row"])
@pytest.mark.parametrize("impl", ["cpu", "torch"])
def test_fp64_dense_mask_broadcast_shapes(impl, shape):
    """[1, h, sq, sk] (one mask per head) and [b, 1, 1, sk] (a padding mask in dense form)."""
    leaves, kw = make_inputs(sq=6, sk=8, variant="learnable")
    kw["mask"] = dense_mask(1, 6, 8, h=4) if shape == "per_head" else dense_mask(2, 1, 8)
    dout = dout_for(leaves)
    out, grads = run_attention(leaves, kw, impl, dout)
    ref, ref_grads = oracle_fp64(leaves, kw, dout)
    assert_match(out, grads, ref, ref_grads, FP64_TOL, leaves)


@pytest.mark.parametrize("clip", [None, (-0.1, 1.1)], ids=["noclip", "clip11"])
@pytest.mark.parametrize("variant", ["vanilla", "learnable"])
def test_dense_mask_fully_masked_rows(variant, clip):
    """Rows a dense mask masks entirely: exactly zero output and gradients (fp64), the rest as the oracle."""
    leaves, kw = make_inputs(sq=7, sk=7, variant=variant)
    mask = dense_mask(2, 7, 7)
    mask[0, 0, 3] = True
    mask[1, 0, 0] = True
    kw.update(mask=mask, clip=clip)
    dout = dout_for(leaves)
    for impl in ("cpu", "torch"):
        out, grads = run_attention(leaves, kw, impl, dout)
        assert (out[0, 3] == 0).all() and (out[1, 0] == 0).all(), impl
        assert (grads["q"][0, 3] == 0).all() and (grads["gate"][1, 0] == 0).all(), impl
        live = torch.ones(2, 7, dtype=torch.bool)
        live[0, 3] = live[1, 0] = False
        ref, _ = oracle_fp64(leaves, kw, dout)
        torch.testing.assert_close(out[live], ref[live], **FP64_TOL)


def test_dense_mask_is_refused_by_the_flash_kernel():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="mask with impl='triton'"):
        outeff_attention(q, q, q, mask=torch.zeros(1, 1, 4, 4, dtype=torch.bool), impl="triton")


# ------------------------------------------------------------------------------------------------
# dispatch and structure
# ------------------------------------------------------------------------------------------------
def test_auto_chooses_the_cpu_paths(monkeypatch):
    """impl='auto' on CPU: the fused path for unclipped variants, the lean materialised one for clipped
    variants, the reference for dropout."""
    calls = []
    for module, name in (
        (attention_module, "sdpa_outeff_attention"),
        (cpu_attention_module, "clipped_outeff_attention"),
    ):
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)
        )
    q = torch.randn(1, 8, 2, 16)
    for variant, kw in VARIANTS.items():
        if variant == "learnable":
            kw = dict(kw, offset=torch.zeros(2))
        calls.clear()
        outeff_attention(q, q, q, causal=True, **kw)
        outeff_attention(q, q, q, causal=True, clip=(-0.03, 1.0), **kw)
        assert calls == ["sdpa_outeff_attention", "clipped_outeff_attention"], f"{variant}: {calls}"
        calls.clear()
        outeff_attention(q, q, q, causal=True, dropout_p=0.1, **kw)
        outeff_attention(q, q, q, causal=True, dropout_p=0.1, clip=(-0.03, 1.0), **kw)
        assert calls == [], f"{variant}: dropout must run the reference"


def test_forced_cpu_refuses_dropout():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="impl='cpu'.*dropout"):
        outeff_attention(q, q, q, impl="cpu", dropout_p=0.1)


# ------------------------------------------------------------------------------------------------
# clipped variants (lean materialised path)
# ------------------------------------------------------------------------------------------------
CLIPS = {"clip03": (-0.03, 1.0), "clip11": (-0.1, 1.1), "gamma0": (0.0, 1.0)}
CLIP_CASES = [
    (v, c, m)
    for v in VARIANTS
    for c in CLIPS
    for m in ("causal", "causal_pad_sq>sk", "pad")
    if not (v == "vanilla" and m == "causal_pad_sq>sk")
]


@pytest.mark.parametrize("variant,clip,mask", CLIP_CASES, ids=[f"{v}-{c}-{m}" for v, c, m in CLIP_CASES])
def test_clipped_fp64_against_definition(variant, clip, mask):
    m = MASKS[mask]
    leaves, kw = make_inputs(sq=m["sq"], sk=m["sk"], h_kv=2, variant=variant, pad=m["pad"])
    kw.update(causal=m["causal"], clip=CLIPS[clip])
    dout = dout_for(leaves)
    out, grads = run_attention(leaves, kw, "cpu", dout)
    ref, ref_grads = oracle_fp64(leaves, kw, dout)
    assert_match(out, grads, ref, ref_grads, FP64_TOL, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["softmax1", "learnable"])
def test_clipped_against_reference(dtype, variant):
    leaves, kw = make_inputs(b=1, sq=40, sk=40, h=4, h_kv=1, d=32, variant=variant, dtype=dtype, pad=True)
    kw.update(causal=True, clip=CLIPS["clip11"])
    dout = dout_for(leaves)
    out, grads = run_attention(leaves, kw, "cpu", dout)
    ref, ref_grads = run_attention(leaves, kw, "torch", dout.float(), upcast=True)
    assert_match(out, grads, ref, ref_grads, TOL[dtype], leaves)


def saved_tensor_sizes(b, s, h, d, clip):
    """numel of every tensor autograd saves for one learnable-offset, gated, causal forward (impl='auto')."""
    leaves, kw = make_inputs(b=b, sq=s, sk=s, h=h, h_kv=h, d=d, variant="learnable", dtype=torch.float32)
    xs = {n: t.clone().requires_grad_(True) for n, t in leaves.items()}
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        outeff_attention(
            xs["q"], xs["k"], xs["v"], offset=xs["offset"], gate=xs["gate"], causal=True, clip=clip, impl="auto", **kw
        )
    assert sizes
    return sizes


def test_saved_tensors_are_linear_in_sq():
    """Unclipped: nothing the backward keeps is O(sq * sk), the largest saved tensor is q / k / v / out sized."""
    b, s, h, d = 1, 256, 2, 16
    sizes = saved_tensor_sizes(b, s, h, d, clip=None)
    assert max(sizes) <= b * s * h * d, f"saved tensor of {max(sizes)} elements (score matrix: {b * h * s * s})"


def test_clipped_saves_one_score_matrix():
    """Clipped: exactly one [b, h, sq, sk] tensor (P) is kept for the backward."""
    b, s, h, d = 1, 64, 2, 16
    sizes = saved_tensor_sizes(b, s, h, d, clip=CLIPS["clip03"])
    assert sum(n >= b * h * s * s for n in sizes) == 1, sizes
