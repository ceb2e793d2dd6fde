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
    float32   atol 1e-4  rtol 1e-3   (fp32 operands, input_precision="ieee")
    float16   atol 5e-3  rtol 1e-2   (emulated on CPU with fp16 dot operands at sq = 512: worst
                                      error 0.13 of this bound)
    bfloat16  atol 4e-2  rtol 4e-2
On a CUDA machine the small-shape tests run compiled too (on the GPU), and then use GPU_TOL.
EXTREME: in rows whose probabilities saturate (logits +-1e4, or all logits ~ -50 with no sink)
dS = P * (dP - D) cancels to ~0, and the fp32 rounding of D = rowsum(dO * O) (FlashAttention-2's
formulation) is multiplied by the other operand; there the atol of dq is multiplied by max(1, max|k|)
and the atol of dk by max(1, max|q|) (q reaches ~1.6e4 in the extreme-logit test). Output, dv, gate
and offset gradients keep the plain tolerances.
Shapes on CPU are tiny (the interpreter is ~1000x slower than torch); blocks are 32 x 32 there, so
sk = 96 spans three key blocks and sq, sk not multiples of 32 exercise the ragged-edge masking.
"""
from __future__ import annotations

import math
import textwrap

import pytest
import torch

from attention_cases import OFFSETS, TOL, VARIANTS, assert_all_close
from megatron_outeff.ops import flash_attention as fa
from megatron_outeff.ops import outeff_attention

GPU_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-3),
    torch.float16: dict(atol=5e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}

CLIPS = {"noclip": None, "clip03": (-0.03, 1.0), "clip11": (-0.1, 1.1)}
# On a CUDA machine the same small-shape tests run with compiled Triton (fp16/bf16 dot operands),
# compared at GPU_TOL; on CPU they run under the interpreter at TOL.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_TOL = GPU_TOL if DEVICE == "cuda" else TOL


def make_inputs(b=2, sq=20, sk=12, h=4, h_kv=2, d=32, dtype=torch.float32, variant="softmax1", gate=False,
                pad=False, q_scale=1.0, seed=0, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, sq, h, d, generator=gen) * q_scale).to(device=device, dtype=dtype)
    k = torch.randn(b, sk, h_kv, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(b, sk, h_kv, d, generator=gen).to(device=device, dtype=dtype)
    kw = dict(VARIANTS[variant])
    leaves = {"q": q, "k": k, "v": v}
    if variant == "learnable":
        leaves["offset"] = torch.tensor([OFFSETS[i % len(OFFSETS)] for i in range(h)], device=device)
    if gate:
        leaves["gate"] = torch.rand(b, sq, h, generator=gen).mul(0.98).add(0.01).to(device=device, dtype=dtype)
    if pad:
        m = torch.ones(b, sk, dtype=torch.bool)
        m[0, sk - max(1, sk // 3):] = False          # tail padding in batch 0
        m[-1, : sk // 4] = False                     # head padding in the last batch
        m[-1, sk // 2] = False
        kw["key_padding_mask"] = m.to(device)
    return leaves, kw


def run_attention(leaves, kw, impl, dout, upcast=False):
    """Runs one implementation on fresh leaf copies; returns (out, {name: grad})."""
    xs = {n: t.detach().clone().float() if upcast else t.detach().clone() for n, t in leaves.items()}
    for t in xs.values():
        t.requires_grad_(True)
    out = outeff_attention(xs["q"], xs["k"], xs["v"], offset=xs.get("offset"), gate=xs.get("gate"), impl=impl, **kw)
    out.backward(dout.to(out.dtype))
    return out, {n: t.grad for n, t in xs.items()}


def check_against_reference(leaves, kw, tol=None, seed=1, operand_scaled=False):
    """operand_scaled: for saturated rows (see EXTREME in the module docstring) the atol of dq / dk is
    multiplied by max(1, max|k|) / max(1, max|q|)."""
    dtype = leaves["q"].dtype
    tol = tol or SMALL_TOL[dtype]
    gen = torch.Generator().manual_seed(seed)
    b, sq, h, d = leaves["q"].shape
    dout = torch.randn(b, sq, h, d, generator=gen).to(device=leaves["q"].device, dtype=dtype)
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


@pytest.mark.parametrize("variant,clip,gate,causal,pad,sq,sk", COMBOS,
                         ids=[f"{c[0]}-{c[1]}-g{int(c[2])}-c{int(c[3])}-p{int(c[4])}-{c[5]}x{c[6]}" for c in COMBOS])
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


@pytest.mark.parametrize("dtype,variant,clip,gate,causal,pad", DTYPE_CASES,
                         ids=[f"{str(c[0])[6:]}-{c[1]}-{c[2]}-g{int(c[3])}-c{int(c[4])}-p{int(c[5])}" for c in DTYPE_CASES])
def test_low_precision(dtype, variant, clip, gate, causal, pad):
    leaves, kw = make_inputs(sq=40, sk=28, dtype=dtype, variant=variant, gate=gate, pad=pad)
    check_against_reference(leaves, dict(kw, clip=CLIPS.get(clip), causal=causal))


@pytest.mark.parametrize("d,h,h_kv,variant,clip,causal", [
    (16, 2, 2, "softmax1", "clip11", False),
    (64, 4, 1, "learnable", None, True),
    (64, 4, 4, "vanilla", "clip03", True),
    (128, 2, 1, "softmax_n0.5", None, False),
], ids=["d16-mha-clip", "d64-gqa1-learnable-causal", "d64-mha-vanilla-clip-causal", "d128-gqa1-softmax_n"])
def test_head_dims_and_gqa(d, h, h_kv, variant, clip, causal):
    leaves, kw = make_inputs(b=1, sq=24, sk=40, h=h, h_kv=h_kv, d=d, variant=variant, gate=True)
    check_against_reference(leaves, dict(kw, clip=CLIPS.get(clip), causal=causal))


@pytest.mark.parametrize("variant,clip,dtype", [
    ("learnable", None, torch.float32),
    ("softmax1", "clip11", torch.float32),
    ("learnable", "clip03", torch.float16),
], ids=["learnable-fp32", "softmax1-clip-fp32", "learnable-clip-fp16"])
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
    leaves = {"q": qkv[:, :, 0], "k": qkv[:, :, 1], "v": qkv[:, :, 2], "gate": gate,
              "offset": torch.tensor([1.0, -2.0], device=DEVICE)}
    for t in ("q", "k", "v", "gate"):
        assert not leaves[t].is_contiguous()
    # run_attention clones (keeping strides of the clone = contiguous); test the views directly too
    out = outeff_attention(leaves["q"], leaves["k"], leaves["v"], softmax="learnable", offset=leaves["offset"],
                           gate=gate, causal=True, impl="triton")
    ref = outeff_attention(leaves["q"], leaves["k"], leaves["v"], softmax="learnable", offset=leaves["offset"],
                           gate=gate, causal=True, impl="torch")
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


@pytest.mark.parametrize("blocks", [
    dict(fwd=(32, 16), dq=(16, 32), dkdv=(32, 16)),
    dict(fwd=(16, 32), dq=(32, 16), dkdv=(16, 32)),
], ids=["tall", "wide"])
def test_unequal_block_sizes(monkeypatch, blocks):
    """BLOCK_M != BLOCK_N (as in the CUDA defaults): the causal loop bounds of every kernel."""
    monkeypatch.setattr(fa, "_config", lambda d, interpreting: dict(blocks, warps=4, stages=1))
    leaves, kw = make_inputs(b=1, sq=40, sk=56, h=2, h_kv=1, variant="learnable", gate=True, pad=True)
    check_against_reference(leaves, dict(kw, clip=(-0.03, 1.0), causal=True))
    leaves, kw = make_inputs(b=1, sq=50, sk=30, h=2, h_kv=2, variant="softmax1")
    check_against_reference(leaves, dict(kw, causal=True))


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


@pytest.mark.parametrize("variant,clip,dtype", [
    ("vanilla", None, torch.float32),
    ("softmax1", None, torch.float32),
    ("learnable", "clip11", torch.float32),
    ("softmax1", None, torch.float16),
], ids=["vanilla", "softmax1", "learnable-clip", "softmax1-fp16"])
def test_extreme_logits(variant, clip, dtype):
    """q scaled so logits reach +-1e4: the online max and the sink shift must keep exp() finite."""
    leaves, kw = make_inputs(b=1, sq=20, sk=40, h=2, h_kv=1, d=32, dtype=dtype, variant=variant,
                             q_scale=4000.0, gate=True)
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
        outeff_attention(leaves["q"], leaves["k"], leaves["v"], softmax="learnable", offset=o,
                         clip=(-0.03, 1.0), impl=impl).sum().backward()
    assert off.grad.dtype == torch.bfloat16
    torch.testing.assert_close(off.grad.float(), off_ref.grad.float(), **SMALL_TOL[torch.bfloat16])


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [24, 8, 256])
def test_unsupported_head_dim(d):
    q = torch.randn(1, 4, 2, d, device=DEVICE)
    with pytest.raises(ValueError, match=rf"head_dim={d}: .*16, 32, 64, 128") as exc:
        outeff_attention(q, q, q, impl="triton")
    assert "\n" not in str(exc.value)


def test_unsupported_dtype():
    q = torch.randn(1, 4, 2, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"dtype torch.float64"):
        outeff_attention(q, q, q, impl="triton")


# ---------------------------------------------------------------------------------------------
# Compilation for H100 (sm_90) without a GPU: the interpreter accepts constructs that the compiler
# rejects (tl.dot shapes and dtypes, type unification across branches), so compile every kernel
# ahead of time with the CUDA defaults of _config, in a subprocess without TRITON_INTERPRET: every
# constexpr flag on (fp16 unclipped, bf16 clipped) and off (fp16 clipped), both passes of the dQ kernel.
# ---------------------------------------------------------------------------------------------

_AOT_SCRIPT = textwrap.dedent("""
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from megatron_outeff.ops import flash_attention as fa

    PTRS = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", "Gate"}
    FP32_PTRS = {"OutU", "Lse", "Sink", "Delta", "O", "DGate"}
    SCALARS = {"qk_scale", "sm_scale", "clip_c", "clip_gamma"}
    STRIDES = {"stride_q", "stride_k", "stride_v", "stride_o", "stride_do", "stride_g", "stride_dq", "stride_dk"}

    def build(fn, dt, consts, cfg):
        sig = {}
        for n in fn.arg_names:
            sig[n] = ("constexpr" if n in consts else "*" + dt if n in PTRS else "*fp32" if n in FP32_PTRS
                      else "*i8" if n == "Kpm" else "fp32" if n in SCALARS else ("i32",) * 3 if n in STRIDES
                      else "i32")
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
        triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=cfg["warps"], num_stages=cfg["stages"]))
        print("compiled", fn.__name__, dt, consts["BLOCK_D"], flush=True)

    for dt, d, clip, on in (("fp16", 64, False, True), ("bf16", 128, True, True), ("fp16", 32, True, False)):
        cfg = fa._config(d, False)
        base = dict(DOT_T=getattr(tl, {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dt]), PREC="ieee",
                    BLOCK_D=d, HAS_GATE=on, CAUSAL=on, HAS_KPM=on)
        build(fa._fwd_kernel, dt, dict(base, HAS_SINK=on, HAS_CLIP=clip, SAVE_UNGATED=on,
                                       BLOCK_M=cfg["fwd"][0], BLOCK_N=cfg["fwd"][1]), cfg)
        if on or not clip:  # launched only then
            build(fa._bwd_preprocess_kernel, dt, dict(HAS_GATE=on, O_UNGATED=on, STORE_DELTA=not clip,
                                                      BLOCK_M=cfg["dq"][0], BLOCK_D=d), cfg)
        for delta_pass in ((True, False) if clip else (False,)):
            build(fa._bwd_dq_kernel, dt, dict(base, CLIP_DELTA=delta_pass, HAS_CLIP=clip,
                                              BLOCK_M=cfg["dq"][0], BLOCK_N=cfg["dq"][1]), cfg)
        build(fa._bwd_dkdv_kernel, dt, dict(base, HAS_CLIP=clip, BLOCK_M=cfg["dkdv"][0], BLOCK_N=cfg["dkdv"][1]), cfg)
    print("AOT OK")
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90(run_compiled_triton):
    """~1 min cold on 2 cores (Triton's cache makes reruns fast)."""
    res = run_compiled_triton(_AOT_SCRIPT)
    assert res.returncode == 0 and "AOT OK" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


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
]


@pytest.mark.gpu
@pytest.mark.parametrize("d,dtype,variant,clip,gate,causal,pad", GPU_CASES,
                         ids=[f"d{c[0]}-{str(c[1])[6:]}-{c[2]}-{c[3]}-g{int(c[4])}-c{int(c[5])}-p{int(c[6])}"
                              for c in GPU_CASES])
def test_gpu_large(d, dtype, variant, clip, gate, causal, pad):
    leaves, kw = make_inputs(b=2, sq=1024, sk=1024, h=4, h_kv=2, d=d, dtype=dtype, variant=variant,
                             gate=gate, pad=pad, device="cuda")
    check_against_reference(leaves, dict(kw, clip=CLIPS.get(clip), causal=causal), tol=GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_ragged_gqa(dtype):
    leaves, kw = make_inputs(b=2, sq=1000, sk=1100, h=8, h_kv=1, d=64, dtype=dtype, variant="learnable",
                             gate=True, pad=True, device="cuda")
    check_against_reference(leaves, dict(kw, clip=(-0.03, 1.0), causal=True), tol=GPU_TOL[dtype])


@pytest.mark.gpu
def test_gpu_fp32():
    leaves, kw = make_inputs(b=1, sq=512, sk=512, h=2, h_kv=2, d=64, dtype=torch.float32, variant="softmax1",
                             gate=True, device="cuda")
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
    leaves, kw = make_inputs(b=b, sq=sq, sk=sk, h=4, h_kv=2, d=d, dtype=dtype, variant="learnable", gate=True,
                             device="cuda")
    m = torch.ones(b, sk, dtype=torch.bool, device="cuda")
    m[0] = False
    out, grads = check_against_reference(leaves, dict(kw, key_padding_mask=m, causal=True, clip=(-0.03, 1.0)),
                                         tol=GPU_TOL[dtype])
    assert (out[0] == 0).all() and (out[1, : sq - sk] == 0).all()
    assert (grads["q"][0] == 0).all() and (grads["q"][1, : sq - sk] == 0).all()
    assert (grads["k"][0] == 0).all() and (grads["v"][0] == 0).all() and (grads["gate"][0] == 0).all()

    leaves, kw = make_inputs(b=1, sq=256, sk=384, h=4, h_kv=1, d=d, dtype=dtype, variant="softmax1", q_scale=4000.0,
                             gate=True, device="cuda")
    logits = torch.einsum("bqhd,bkd->bhqk", leaves["q"].float(), leaves["k"][:, :, 0].float()) / math.sqrt(d)
    assert logits.abs().max() > 1e4
    check_against_reference(leaves, dict(kw, causal=True), tol=GPU_TOL[dtype], operand_scaled=True)
