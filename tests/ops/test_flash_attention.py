"""Triton flash attention (megatron_outeff/ops/flash_attention.py) against the plain-PyTorch reference.

Every check compares the kernel's output and its gradients w.r.t. q, k, v, the learnable offset and
the gate with ``outeff_attention_reference`` (through ``outeff_attention(impl="torch")``), evaluated
on fp32 copies of the very same inputs (so low-precision runs are compared with exact math, not with
a second rounded computation).

Tolerances (torch.testing.assert_close, |actual - expected| <= atol + rtol * |expected|), one pair per
input dtype, used for the output and for every gradient:
    float32   atol 1e-5  rtol 1e-4
    float16   atol 2e-3  rtol 2e-3
    bfloat16  atol 1.6e-2 rtol 1.6e-2
On CPU the kernels run under the Triton interpreter with fp32 arithmetic throughout, so the error is
the rounding of the results to the input dtype plus fp32 summation-order noise. The `gpu` tests
(compiled Triton, fp16/bf16 tl.dot operands, sq = 1024) use GPU_TOL:
    float32   atol 5e-3  rtol 1e-2   (fp32 inputs go through TF32 products: a 10-bit mantissa, as fp16)
    float16   atol 5e-3  rtol 1e-2   (emulated on CPU with fp16 dot operands at sq = 512: worst
                                      error 0.13 of this bound)
    bfloat16  atol 4e-2  rtol 4e-2
On a CUDA machine the small-shape tests run compiled too (on the GPU), and then use GPU_TOL.
EXTREME: in rows whose probabilities saturate (logits +-1e4, or all logits ~ -50 with no sink)
dS = P * (dP - D) cancels to ~0, and the fp32 rounding of D = rowsum(dO * O) (FlashAttention-2's
formulation) is multiplied by the other operand; there the atol of dq is multiplied by max(1, max|k|)
and the atol of dk by max(1, max|q|) (q reaches 4096 in the extreme-logit test). Output, dv, gate
and offset gradients keep the plain tolerances. The extreme-logit inputs are integers times a power of
two, so every logit is exact in fp32 whatever the summation order: the backward recomputes the logits
with the keys on the matrix instructions' M dimension (another summation order than the forward's),
and a logit of 1e4 rounded differently would move the recomputed P by ~1e-3 relative (an inherent
property of FlashAttention's recomputation, not what these tests are about: overflow handling).
Shapes on CPU are tiny (the interpreter is ~1000x slower than torch); blocks are 32 x 32 there, so
sk = 96 spans three key blocks and sq, sk not multiples of 32 exercise the ragged-edge masking.
"""

from __future__ import annotations

import json
import math
import textwrap

import attention_cases
import pytest
import torch
from attention_cases import OFFSETS, TOL, VARIANTS, assert_all_close, dout_for, run_attention

from megatron_outeff.ops import flash_attention as fa
from megatron_outeff.ops import outeff_attention

GPU_TOL = {
    torch.float32: dict(atol=5e-3, rtol=1e-2),
    torch.float16: dict(atol=5e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}

CLIPS = {"noclip": None, "clip03": (-0.03, 1.0), "clip11": (-0.1, 1.1)}
# On a CUDA machine the same small-shape tests run with compiled Triton (fp16/bf16 dot operands),
# compared at GPU_TOL; on CPU they run under the interpreter at TOL.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TOL = GPU_TOL if DEVICE == "cuda" else TOL


def make_inputs(
    b=2, sq=20, sk=12, h=4, h_kv=2, d=32, dtype=torch.float32, variant="softmax1", gate=False, pad=False, **kw
):
    """attention_cases.make_inputs at this file's defaults: GQA 4 -> 2, fp32, no gate, on DEVICE, the padding
    with a hole in the middle (extreme: see test_extreme_logits)."""
    kw.setdefault("device", DEVICE)
    return attention_cases.make_inputs(
        b, sq, sk, h, h_kv, d, dtype=dtype, gate=gate, variant=variant, pad=pad, hole=True, **kw
    )


def check_against_reference(leaves, kw, tol=None, seed=1, operand_scaled=False):
    """operand_scaled: for saturated rows (see EXTREME in the module docstring) the atol of dq / dk is
    multiplied by max(1, max|k|) / max(1, max|q|)."""
    dtype = leaves["q"].dtype
    tol = tol or SMALL_TOL[dtype]
    b, sq, h, d = leaves["q"].shape
    dout = dout_for(leaves, seed)
    out, grads = run_attention(leaves, kw, "triton", dout)
    ref, ref_grads = run_attention(leaves, kw, "torch", dout.float(), upcast=True)
    assert out.dtype == dtype and out.shape == (b, sq, h, d)
    atol = {}
    if operand_scaled:
        for name, other in (("q", "k"), ("k", "q")):
            atol[name] = tol["atol"] * max(1.0, leaves[other].float().abs().max().item())
    assert_all_close(out, grads, ref, ref_grads, leaves, tol, atol, dtype=torch.float32)
    return out, grads


# ---------------------------------------------------------------------------------------------
# Every variant x every clip setting (short rows: sk = 12 < one block, where the sink matters most)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", list(CLIPS), ids=list(CLIPS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_clip_short_rows(variant, clip):
    leaves, kw = make_inputs(sq=20, sk=12, variant=variant)
    check_against_reference(leaves, dict(kw, clip=CLIPS[clip]))


# Gate, causal, padding and their combinations, per variant (ragged sq != sk, GQA 4 -> 2).
COMBOS = [
    # (variant, clip, gate, causal, pad, sq, sk)
    ("vanilla", None, True, False, False, 20, 40),
    ("vanilla", "clip11", False, True, True, 40, 24),
    ("softmax1", None, False, True, False, 24, 40),
    ("softmax1", "clip03", True, True, True, 40, 40),
    ("softmax_n2.5", None, True, False, True, 33, 17),
    ("softmax_n0.5", "clip11", True, True, False, 17, 33),
    ("learnable", None, True, True, True, 36, 44),
    ("learnable", "clip11", True, False, True, 36, 44),
    ("learnable", "clip03", False, True, False, 44, 36),
]


@pytest.mark.parametrize(
    "variant,clip,gate,causal,pad,sq,sk",
    COMBOS,
    ids=[f"{c[0]}-{c[1]}-g{int(c[2])}-c{int(c[3])}-p{int(c[4])}-{c[5]}x{c[6]}" for c in COMBOS],
)
def test_gate_causal_padding(variant, clip, gate, causal, pad, sq, sk):
    leaves, kw = make_inputs(sq=sq, sk=sk, variant=variant, gate=gate, pad=pad)
    check_against_reference(leaves, dict(kw, clip=CLIPS.get(clip), causal=causal))


# ---------------------------------------------------------------------------------------------
# Dtypes, head dims, GQA, longer rows (several key blocks)
# ---------------------------------------------------------------------------------------------

DTYPE_CASES = [
    # (dtype, variant, clip, gate, causal, pad)
    (torch.float16, "softmax1", None, False, False, False),
    (torch.float16, "learnable", "clip11", True, True, True),
    (torch.float16, "vanilla", None, True, True, False),
    (torch.bfloat16, "softmax_n2.5", None, False, True, True),
    (torch.bfloat16, "learnable", "clip03", True, False, False),
]


@pytest.mark.parametrize(
    "dtype,variant,clip,gate,causal,pad",
    DTYPE_CASES,
    ids=[f"{str(c[0])[6:]}-{c[1]}-{c[2]}-g{int(c[3])}-c{int(c[4])}-p{int(c[5])}" for c in DTYPE_CASES],
)
def test_low_precision(dtype, variant, clip, gate, causal, pad):
    leaves, kw = make_inputs(sq=40, sk=28, dtype=dtype, variant=variant, gate=gate, pad=pad)
    check_against_reference(leaves, dict(kw, clip=CLIPS.get(clip), causal=causal))


@pytest.mark.parametrize(
    "d,h,h_kv,variant,clip,causal",
    [
        (16, 2, 2, "softmax1", "clip11", False),
        (64, 4, 1, "learnable", None, True),
        (64, 4, 4, "vanilla", "clip03", True),
        (128, 2, 1, "softmax_n0.5", None, False),
        # head dims that are not powers of two: padded to BLOCK_D with masked (zero) columns
        (80, 4, 2, "learnable", "clip11", True),  # OPT-2.7b
        (96, 2, 1, "softmax1", None, True),
        (24, 6, 2, "vanilla", None, False),
        (8, 2, 1, "softmax_n2.5", "clip03", True),
    ],
    ids=[
        "d16-mha-clip",
        "d64-gqa1-learnable-causal",
        "d64-mha-vanilla-clip-causal",
        "d128-gqa1-softmax_n",
        "d80-gqa2-learnable-clip-causal",
        "d96-gqa1-softmax1-causal",
        "d24-gqa3-vanilla",
        "d8-softmax_n-clip-causal",
    ],
)
def test_head_dims_and_gqa(d, h, h_kv, variant, clip, causal):
    leaves, kw = make_inputs(b=1, sq=24, sk=40, h=h, h_kv=h_kv, d=d, variant=variant, gate=True)
    check_against_reference(leaves, dict(kw, clip=CLIPS.get(clip), causal=causal))


@pytest.mark.parametrize(
    "variant,clip,dtype",
    [("learnable", None, torch.float32), ("softmax1", "clip11", torch.float32), ("learnable", "clip03", torch.float16)],
    ids=["learnable-fp32", "softmax1-clip-fp32", "learnable-clip-fp16"],
)
def test_long_rows_multi_block(variant, clip, dtype):
    """sq = sk = 96: three query and three key blocks, causal with padding and gate."""
    leaves, kw = make_inputs(b=1, sq=96, sk=96, h=2, h_kv=1, d=32, dtype=dtype, variant=variant, gate=True, pad=True)
    check_against_reference(leaves, dict(kw, clip=CLIPS.get(clip), causal=True))


def test_non_contiguous_inputs():
    """q, k, v as strided views of a packed [b, s, 3, h, d] buffer; gate a transposed view."""
    gen = torch.Generator().manual_seed(3)
    b, s, h, d = 2, 24, 2, 32
    qkv = torch.randn(b, s, 3, h, d, generator=gen).to(DEVICE)
    gate = torch.rand(b, h, s, generator=gen).to(DEVICE).transpose(1, 2)
    leaves = {
        "q": qkv[:, :, 0],
        "k": qkv[:, :, 1],
        "v": qkv[:, :, 2],
        "gate": gate,
        "offset": torch.tensor([1.0, -2.0], device=DEVICE),
    }
    for t in ("q", "k", "v", "gate"):
        assert not leaves[t].is_contiguous()
    # run_attention clones (keeping strides of the clone = contiguous); test the views directly too
    kw = dict(softmax="learnable", offset=leaves["offset"], gate=gate, causal=True)
    out, ref = (
        outeff_attention(leaves["q"], leaves["k"], leaves["v"], impl=impl, **kw) for impl in ("triton", "torch")
    )
    torch.testing.assert_close(out, ref, **SMALL_TOL[torch.float32])
    check_against_reference(leaves, dict(softmax="learnable", causal=True, clip=(-0.1, 1.1)))


@pytest.mark.parametrize("clip", [None, "clip11"], ids=["noclip", "clip11"])
def test_gate_without_grad(clip):
    """A gate that needs no gradient (D from the gated output) and frozen k, v: only dq and d(offset)."""
    leaves, kw = make_inputs(sq=24, sk=20, variant="learnable", gate=True, pad=True)
    kw = dict(kw, clip=CLIPS.get(clip), causal=True)
    grads = {}
    for impl in ("triton", "torch"):
        q = leaves["q"].detach().clone().requires_grad_(True)
        off = leaves["offset"].detach().clone().requires_grad_(True)
        out = outeff_attention(q, leaves["k"], leaves["v"], offset=off, gate=leaves["gate"], impl=impl, **kw)
        out.backward(torch.ones_like(out))
        grads[impl] = (out.detach(), q.grad, off.grad)
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, **SMALL_TOL[torch.float32])


@pytest.mark.parametrize(
    "blocks",
    [dict(fwd=(32, 16), dq=(16, 32), bwd=(32, 16)), dict(fwd=(16, 32), dq=(32, 16), bwd=(16, 32))],
    ids=["tall", "wide"],
)
def test_unequal_block_sizes(monkeypatch, blocks):
    """BLOCK_M != BLOCK_N (as in the CUDA candidates): the causal loop bounds of every kernel."""
    cands = dict(fa._INTERPRETER, **{kind: (fa._cfg(bm, bn, 4, 1),) for kind, (bm, bn) in blocks.items()})
    monkeypatch.setattr(fa, "_INTERPRETER", cands)
    leaves, kw = make_inputs(b=1, sq=40, sk=56, h=2, h_kv=1, variant="learnable", gate=True, pad=True)
    check_against_reference(leaves, dict(kw, clip=(-0.03, 1.0), causal=True))
    leaves, kw = make_inputs(b=1, sq=50, sk=30, h=2, h_kv=2, variant="softmax1")
    check_against_reference(leaves, dict(kw, causal=True))


@pytest.mark.parametrize("sq,sk", [(64, 64), (33, 97), (97, 33), (64, 128), (128, 64), (1, 70), (70, 1)])
def test_causal_tile_boundaries(sq, sk):
    """Causal (bottom-right aligned) with sq != sk: every loop is split into full tiles (no mask computed)
    and masked ones (the diagonal, the partial last tile); 32 x 32 tiles, so these shapes put the
    diagonal at every offset from a tile edge, with rows that see no key (sq > sk) and a single row."""
    leaves, kw = make_inputs(b=1, sq=sq, sk=sk, h=2, h_kv=1, variant="learnable", gate=True, seed=sq + sk)
    check_against_reference(leaves, dict(kw, causal=True))
    if sq > 32 and sk > 32:
        check_against_reference(leaves, dict(kw, causal=True, clip=(-0.03, 1.0)))


@pytest.mark.parametrize("mode", ["pass", "atomic", "deterministic"])
def test_dq_structures(monkeypatch, mode):
    """dQ from the second pass over the keys (_bwd_dq_kernel; the default, and always under
    torch.use_deterministic_algorithms(True), even with OUTEFF_FLASH_DQ=atomic) or by atomics in the
    dK/dV kernel (OUTEFF_FLASH_DQ=atomic): both match the reference; the pass is bitwise reproducible."""
    leaves, kw = make_inputs(b=1, sq=40, sk=72, h=4, h_kv=2, variant="learnable", gate=True, pad=True)
    kw = dict(kw, causal=True)
    monkeypatch.setenv("OUTEFF_FLASH_DQ", "pass" if mode == "pass" else "atomic")
    det = mode == "deterministic"
    q = leaves["q"]
    o = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1], device=q.device)
    launches = fa.backward_launches(
        q, leaves["k"], leaves["v"], q, None, None, o, lse, 0.1, 1.0, 0.0, False, True, False, True, True, det, None
    )[0]
    kinds = [(la.kind, la.meta.get("ATOMIC_DQ")) for la in launches]
    assert kinds == (
        [("pre", None), ("bwd", True)] if mode == "atomic" else [("pre", None), ("dq", None), ("bwd", False)]
    )
    torch.use_deterministic_algorithms(det)
    try:
        grads = [check_against_reference(leaves, kw)[1] for _ in range(1 if mode == "atomic" else 2)]
    finally:
        torch.use_deterministic_algorithms(False)
    for name in grads[-1]:
        assert torch.equal(grads[0][name], grads[-1][name]), name


def test_autotuned_launches(monkeypatch):
    """The CUDA launch path: two candidates per kernel run through triton.autotune (keyed by the flags
    and dtypes). Here triton's own Autotuner times each candidate with a CPU clock instead of the GPU
    benchmarker; with dQ by atomics, every timed trial adds into the dQ buffer, so a wrong
    reset_to_zero shows as a wrong dQ. Both dQ structures, against the reference."""
    import time

    import triton

    from megatron_outeff.ops import _triton_common

    def cpu_bench(fn, quantiles=None, **_):
        t0 = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t0) * 1e3
        return [ms] * len(quantiles) if quantiles else ms

    tuned = []
    real_autotune = triton.autotune

    def autotune(*args, **kwargs):
        tuned.append(kwargs)
        return real_autotune(*args, do_bench=cpu_bench, **kwargs)

    monkeypatch.setattr(triton, "autotune", autotune)
    monkeypatch.setattr(_triton_common, "_TUNERS", {})
    two = {kind: (fa._cfg(32, 32, 4, 1), fa._cfg(16, 32, 4, 1)) for kind in ("fwd", "bwd", "dq")}
    monkeypatch.setattr(fa, "_INTERPRETER", dict(fa._INTERPRETER, **two))
    leaves, kw = make_inputs(b=1, sq=40, sk=48, h=2, h_kv=1, variant="learnable", gate=True)
    for mode in ("atomic", "pass"):
        monkeypatch.setenv("OUTEFF_FLASH_DQ", mode)
        check_against_reference(leaves, dict(kw, causal=True, clip=(-0.03, 1.0)))
    # one tuner per kernel (fwd, dq, bwd); the dK/dV kernel zeroes the atomic dQ buffer before each trial
    assert len(tuned) == 3 and any(t.get("reset_to_zero") == ["DQacc"] for t in tuned)


def test_offsets_past_2_31_elements():
    """64-bit offsets. megatron's q, k, v are strided views of the fused QKV output; here a sequence
    stride of 2^23 elements puts rows 256..287 of every head past 2^31 elements from the view's start
    (int32 offsets would wrap and read other memory). The buffer is ~4.8 GB of virtual memory that
    torch.empty does not touch: only the pages of the ~40k elements used become resident. Forward and
    backward (clipped, causal, GQA) against the reference on contiguous copies."""
    sq, h, h_kv, d, row_stride = 288, 2, 1, 32, 2**23
    assert (sq - 1) * row_stride > 2**31 and row_stride * fa._tile_rows_max() < 2**31  # no copy fallback
    buf = torch.empty(sq, row_stride, dtype=torch.float16, device=DEVICE)
    qkv = buf[:, : (h + 2 * h_kv) * d].view(sq, 1, h + 2 * h_kv, d).permute(1, 0, 2, 3)  # [b=1, sq, heads, d]
    gen = torch.Generator().manual_seed(11)
    qkv.copy_(torch.randn(qkv.shape, generator=gen).to(qkv.dtype))
    views = {
        "q": qkv[:, :, :h],
        "k": qkv[:, :, h : h + h_kv],
        "v": qkv[:, :, h + h_kv :],
        "offset": torch.tensor([0.5, -1.0], device=DEVICE),
    }
    assert views["q"].stride()[1] == row_stride and fa.tile_addressable(views["q"], "q") is views["q"]
    kw = dict(softmax="learnable", causal=True, clip=(-0.03, 1.0))
    dout = torch.randn(1, sq, h, d, generator=gen).to(DEVICE, torch.float16)
    xs = {n: t.detach().requires_grad_(True) for n, t in views.items()}  # still views of buf
    out = outeff_attention(xs["q"], xs["k"], xs["v"], offset=xs["offset"], impl="triton", **kw)
    out.backward(dout)
    ref, ref_grads = run_attention(
        {n: t.contiguous() for n, t in views.items()}, kw, "torch", dout.float(), upcast=True
    )
    assert_all_close(
        out, {n: t.grad for n, t in xs.items()}, ref, ref_grads, views, SMALL_TOL[torch.float16], dtype=torch.float32
    )
    del buf, qkv, views, xs


def test_huge_sequence_stride_is_copied():
    """A view whose sequence stride times the largest tile passes 2^31 (tile offsets are int32) runs on
    a contiguous copy, with the same result."""
    rows = fa._tile_rows_max()
    stride = 2**31 // rows + 64
    buf = torch.empty(3, stride, device=DEVICE)
    q = buf[:, :64].view(3, 1, 2, 32).permute(1, 0, 2, 3)
    q.copy_(torch.randn(q.shape, generator=torch.Generator().manual_seed(2)))
    assert fa.tile_addressable(q, "q").is_contiguous() and not q.is_contiguous()
    torch.testing.assert_close(
        outeff_attention(q, q, q, causal=True, impl="triton"),
        outeff_attention(q.contiguous(), q.contiguous(), q.contiguous(), causal=True, impl="torch"),
        **SMALL_TOL[torch.float32],
    )


# ---------------------------------------------------------------------------------------------
# Fully masked rows, extreme logits, sink-dominated rows
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [None, "clip11"], ids=["noclip", "clip11"])
@pytest.mark.parametrize("variant", ["vanilla", "softmax1", "learnable"])
def test_fully_masked_rows(variant, clip):
    """Batch 0 has every key padded; causal with sq > sk leaves the first sq - sk queries of batch 1
    with no key. Those rows give exactly zero output and zero gradients (never NaN)."""
    b, sq, sk, h = 2, 24, 12, 4
    leaves, kw = make_inputs(b=b, sq=sq, sk=sk, h=h, h_kv=2, variant=variant, gate=True)
    m = torch.ones(b, sk, dtype=torch.bool, device=DEVICE)
    m[0] = False
    kw = dict(kw, key_padding_mask=m, causal=True, clip=CLIPS.get(clip))
    out, grads = check_against_reference(leaves, kw)
    assert (out[0] == 0).all()
    assert (out[1, : sq - sk] == 0).all()
    assert (grads["q"][0] == 0).all() and (grads["q"][1, : sq - sk] == 0).all()
    assert (grads["k"][0] == 0).all() and (grads["v"][0] == 0).all()
    assert (grads["gate"][0] == 0).all() and (grads["gate"][1, : sq - sk] == 0).all()
    if variant == "learnable":
        assert torch.isfinite(grads["offset"]).all()


@pytest.mark.parametrize(
    "variant,clip,dtype",
    [
        ("vanilla", None, torch.float32),
        ("softmax1", None, torch.float32),
        ("learnable", "clip11", torch.float32),
        ("softmax1", None, torch.float16),
    ],
    ids=["vanilla", "softmax1", "learnable-clip", "softmax1-fp16"],
)
def test_extreme_logits(variant, clip, dtype):
    """q scaled so logits reach +-1e4: the online max and the sink shift must keep exp() finite."""
    leaves, kw = make_inputs(
        b=1, sq=20, sk=40, h=2, h_kv=1, d=32, dtype=dtype, variant=variant, extreme=True, gate=True
    )
    d = leaves["q"].shape[-1]
    logits = torch.einsum("bqhd,bkd->bhqk", leaves["q"].float(), leaves["k"][:, :, 0].float()) / math.sqrt(d)
    assert logits.abs().max() > 1e4
    check_against_reference(leaves, dict(kw, clip=CLIPS.get(clip), causal=True), operand_scaled=True)


@pytest.mark.parametrize("variant", ["vanilla", "softmax1", "softmax_n2.5", "learnable"])
def test_all_logits_very_negative(variant):
    """Every logit is about -50: the sink dominates the normaliser (outputs ~ e^-50), vanilla does not."""
    gen = torch.Generator().manual_seed(5)
    b, sq, sk, h, d = 1, 16, 12, 2, 32
    u = torch.ones(d) / math.sqrt(d)
    k = (u * 10.0 + 0.01 * torch.randn(b, sk, 1, d, generator=gen)).to(DEVICE)
    q = (-u * 50.0 * math.sqrt(d) / 10.0 + 0.05 * torch.randn(b, sq, h, d, generator=gen)).to(DEVICE)
    v = torch.randn(b, sk, 1, d, generator=gen).to(DEVICE)
    leaves = {"q": q, "k": k, "v": v}
    kw = dict(VARIANTS[variant])
    if variant == "learnable":
        leaves["offset"] = torch.tensor([-45.0, 2.0], device=DEVICE)
    logits = torch.einsum("bqhd,bkd->bhqk", q, k[:, :, 0]) / math.sqrt(d)
    assert logits.max() < -40
    out, _ = check_against_reference(leaves, kw, operand_scaled=True)
    if variant == "vanilla":
        assert out.abs().max() > 0.05
    else:
        assert out[:, :, 1].abs().max() < 1e-12  # sink dominates (learnable head 1: a = 2)


def test_sink_is_not_ignored():
    """On short rows Softmax_1 differs clearly from softmax; the kernel must match Softmax_1."""
    leaves, kw = make_inputs(b=1, sq=16, sk=6, h=2, h_kv=2, variant="softmax1")
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    out = outeff_attention(q, k, v, softmax="softmax1", impl="triton")
    sm1 = outeff_attention(q, k, v, softmax="softmax1", impl="torch")
    vanilla = outeff_attention(q, k, v, softmax="vanilla", impl="torch")
    torch.testing.assert_close(out, sm1, **SMALL_TOL[torch.float32])
    assert (out - vanilla).abs().max() > 1e-2
    # and the sink gradient is not zero
    off = torch.zeros(2, device=DEVICE, requires_grad=True)
    outeff_attention(q, k, v, softmax="learnable", offset=off, impl="triton").square().sum().backward()
    assert off.grad.abs().min() > 1e-4


def test_offset_gradient_in_bf16_parameter():
    """A bf16 offset parameter receives its gradient through offset.float()."""
    leaves, kw = make_inputs(b=1, sq=16, sk=16, h=4, h_kv=2, variant="softmax1")
    off = torch.tensor(OFFSETS, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    off_ref = off.detach().clone().requires_grad_(True)
    for o, impl in ((off, "triton"), (off_ref, "torch")):
        outeff_attention(
            leaves["q"], leaves["k"], leaves["v"], softmax="learnable", offset=o, clip=(-0.03, 1.0), impl=impl
        ).sum().backward()
    assert off.grad.dtype == torch.bfloat16
    torch.testing.assert_close(off.grad.float(), off_ref.grad.float(), **SMALL_TOL[torch.bfloat16])


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [129, 256])
def test_unsupported_head_dim(d):
    q = torch.randn(1, 4, 2, d, device=DEVICE)
    with pytest.raises(ValueError, match=rf"head_dim={d}: .*1\.\.128") as exc:
        outeff_attention(q, q, q, impl="triton")
    assert "\n" not in str(exc.value)


def test_supported_head_dims_predicate():
    """What the dispatch (ops/dispatch.py) asks: every head dim 1..128 (padded below a power of two)."""
    assert all(fa.supports_head_dim(d) for d in (1, 8, 16, 24, 64, 80, 96, 112, 128))
    assert not any(fa.supports_head_dim(d) for d in (0, 129, 160, 256))
    assert fa.unsupported_reason(torch.bfloat16, 80) is None
    assert "head_dim=160" in fa.unsupported_reason(torch.float16, 160)
    assert "float64" in fa.unsupported_reason(torch.float64, 64)
    assert [fa.block_d(d) for d in (8, 32, 64, 65, 80, 96, 128)] == [64, 64, 64, 128, 128, 128, 128]


def test_unsupported_dtype():
    q = torch.randn(1, 4, 2, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"dtype torch.float64"):
        outeff_attention(q, q, q, impl="triton")


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compilation for A100 (sm_80) and H100 / H200 (sm_90) without a GPU. The interpreter
# accepts what the compiler may reject (tl.dot shapes and dtypes, type unification across branches)
# and says nothing of shared memory, registers or matrix instructions, so every kernel launch the
# launcher can make (megatron_outeff.ops.triton_compile.flash_items: fp16 / bf16 / fp32, head dims
# 64, 80 (padded) and 128, every flag on and every flag off) is compiled with
# every candidate config, specialised on its arguments exactly as Triton's runtime would (16-byte
# aligned pointers, strides divisible by 16), in a subprocess without TRITON_INTERPRET.
# ---------------------------------------------------------------------------------------------

_AOT_SCRIPT = textwrap.dedent("""
    import json, os
    from megatron_outeff.ops.triton_compile import compile_flash
    facts = compile_flash(ARCH, workers=min(2, os.cpu_count() or 1))
    print("FACTS " + json.dumps([f.as_dict() for f in facts]))
""")


def _aot_facts(run_compiled_triton, arch):
    res = run_compiled_triton(_AOT_SCRIPT.replace("ARCH", str(arch)), timeout=3000)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("FACTS "))
    return json.loads(line[len("FACTS ") :])


def _check_aot(facts, arch):
    from megatron_outeff.ops.triton_compile import FAMILY_SHARED_MEMORY_LIMIT, flash_items

    assert len({(f["kernel"], f["config"], f["specialisation"]) for f in facts}) == len(facts) > 0
    # every candidate config of every kernel, for every dtype and head-dim tile, was compiled
    seen = {(f["kernel"], f["config"], f["specialisation"].split()[0], f["specialisation"].split()[1]) for f in facts}
    names = {"fwd": "_fwd_kernel", "bwd": "_bwd_kernel", "dq": "_bwd_dq_kernel", "pre": "_bwd_preprocess_kernel"}
    for dt in ("fp16", "bf16", "fp32"):
        for d in (64, 128):
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dt]
            for kind, name in names.items():
                for c in fa.kernel_configs(kind, d, dtype, True, arch):
                    cfg = (
                        " ".join(f"{k}={v}" for k, v in c.kwargs.items())
                        + f" warps={c.num_warps} stages={c.num_stages}"
                    )
                    assert (name, cfg, dt, f"d{d}") in seen, (name, cfg, dt, d)
    assert len(flash_items(arch)) <= len(facts)
    assert any(f["specialisation"].split()[1] == "d128" and "PAD_D" in f["specialisation"] for f in facts)
    for f in facts:
        where = f"{f['kernel']} sm_{arch} {f['config']} [{f['specialisation']}]"
        assert f["unaligned"] == "", f"{where}: pointers not specialised 16-byte aligned: {f['unaligned']}"
        assert f["shared_bytes"] <= FAMILY_SHARED_MEMORY_LIMIT[arch], f"{where}: {f['shared_bytes']} B shared memory"
        if not f["specialisation"].startswith("fp32"):
            assert f["spill_stores"] == f["spill_loads"] == f["stack_bytes"] == 0, (
                f"{where}: register spills ({f['spill_stores']} stores, {f['spill_loads']} loads, "
                f"{f['registers']} registers, {f['stack_bytes']} B stack)"
            )
    if arch == 90:
        # the d=128 backward (dK/dV kernel, dQ / D' pass) runs on Hopper's warpgroup instructions only
        bwd128 = [
            f
            for f in facts
            if f["kernel"] in ("_bwd_kernel", "_bwd_dq_kernel")
            and " d128 " in f" {f['specialisation']} "
            and not f["specialisation"].startswith("fp32")
        ]
        assert bwd128
        for f in bwd128:
            assert f["wgmma"] > 0 and f["mma"] == 0, (
                f"{f['kernel']} {f['config']} [{f['specialisation']}]: {f['wgmma']} wgmma, {f['mma']} mma.sync"
            )


@pytest.mark.slow
def test_kernels_compile_for_sm90(run_compiled_triton):
    """Every flash launch for sm_90 (H100 / H200): shared memory <= 227 KiB, no register spills in fp16 /
    bf16, the d=128 backward on wgmma only. ~15 min cold on 2 free cores (Triton's cache makes reruns
    take ~1 min); tools/results/flash_compile_report.md has the facts per config."""
    _check_aot(_aot_facts(run_compiled_triton, 90), 90)


@pytest.mark.slow
def test_kernels_compile_for_sm80(run_compiled_triton):
    """Every flash launch for sm_80 (A100): shared memory <= 99 KiB (the sm_86 / sm_89 limit: the
    launcher uses one table for sm_80-89; sm_80's own is 163 KiB), no register spills in fp16 / bf16."""
    _check_aot(_aot_facts(run_compiled_triton, 80), 80)


# ---------------------------------------------------------------------------------------------
# GPU (compiled Triton): larger shapes, skipped on CPU by conftest
# ---------------------------------------------------------------------------------------------

GPU_CASES = [
    # (d, dtype, variant, clip, gate, causal, pad)
    (64, torch.float16, "softmax1", None, False, True, False),
    (64, torch.bfloat16, "learnable", "clip11", True, True, True),
    (128, torch.float16, "learnable", None, True, False, True),
    (128, torch.bfloat16, "vanilla", "clip03", False, True, False),
    (64, torch.float16, "softmax_n2.5", "clip03", True, False, False),
    (128, torch.float16, "softmax1", None, False, True, True),
    (80, torch.bfloat16, "learnable", "clip11", True, True, True),  # OPT-2.7b's head dim, padded to 128
    (96, torch.float16, "softmax1", None, True, True, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "d,dtype,variant,clip,gate,causal,pad",
    GPU_CASES,
    ids=[f"d{c[0]}-{str(c[1])[6:]}-{c[2]}-{c[3]}-g{int(c[4])}-c{int(c[5])}-p{int(c[6])}" for c in GPU_CASES],
)
def test_gpu_large(d, dtype, variant, clip, gate, causal, pad):
    leaves, kw = make_inputs(
        b=2, sq=1024, sk=1024, h=4, h_kv=2, d=d, dtype=dtype, variant=variant, gate=gate, pad=pad, device="cuda"
    )
    check_against_reference(leaves, dict(kw, clip=CLIPS.get(clip), causal=causal), tol=GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_ragged_gqa(dtype):
    leaves, kw = make_inputs(
        b=2, sq=1000, sk=1100, h=8, h_kv=1, d=64, dtype=dtype, variant="learnable", gate=True, pad=True, device="cuda"
    )
    check_against_reference(leaves, dict(kw, clip=(-0.03, 1.0), causal=True), tol=GPU_TOL[dtype])


@pytest.mark.gpu
def test_gpu_fp32():
    leaves, kw = make_inputs(
        b=1, sq=512, sk=512, h=2, h_kv=2, d=64, dtype=torch.float32, variant="softmax1", gate=True, device="cuda"
    )
    check_against_reference(leaves, dict(kw, causal=True), tol=GPU_TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_masked_rows_and_extreme_logits(d, dtype):
    """Compiled kernels at the CUDA block sizes, GQA 4 -> 2 / 4 -> 1, gate, causal:
    - fully masked rows (batch 0 has every key padded; causal with sq > sk leaves the first sq - sk
      queries of batch 1 with no key), clipped learnable offset: exact zeros in output and gradients;
    - logits of +-1e4 (q scaled by 4000), Softmax_1: finite and equal to the reference."""
    b, sq, sk = 2, 320, 200
    leaves, kw = make_inputs(
        b=b, sq=sq, sk=sk, h=4, h_kv=2, d=d, dtype=dtype, variant="learnable", gate=True, device="cuda"
    )
    m = torch.ones(b, sk, dtype=torch.bool, device="cuda")
    m[0] = False
    out, grads = check_against_reference(
        leaves, dict(kw, key_padding_mask=m, causal=True, clip=(-0.03, 1.0)), tol=GPU_TOL[dtype]
    )
    assert (out[0] == 0).all() and (out[1, : sq - sk] == 0).all()
    assert (grads["q"][0] == 0).all() and (grads["q"][1, : sq - sk] == 0).all()
    assert (grads["k"][0] == 0).all() and (grads["v"][0] == 0).all() and (grads["gate"][0] == 0).all()

    leaves, kw = make_inputs(
        b=1, sq=256, sk=384, h=4, h_kv=1, d=d, dtype=dtype, variant="softmax1", extreme=True, gate=True, device="cuda"
    )
    logits = torch.einsum("bqhd,bkd->bhqk", leaves["q"].float(), leaves["k"][:, :, 0].float()) / math.sqrt(d)
    assert logits.abs().max() > 1e4
    check_against_reference(leaves, dict(kw, causal=True), tol=GPU_TOL[dtype], operand_scaled=True)
