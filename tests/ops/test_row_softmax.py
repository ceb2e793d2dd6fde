"""Tests of the fused Triton row softmax (megatron_outeff.ops.row_softmax.fused_outeff_softmax).

Oracles:
  1. megatron_outeff.ops.reference.outeff_softmax_reference, run in fp32 on an fp32 copy of the
     scores (so it is more exact than the kernel's low-precision inputs allow), forward and backward.
  2. megatron-core's own off-by-one path, independent code: SoftmaxOne(-1, offset) on the fp32
     scaled logits with masked positions filled with -10000 (megatron's attention_mask_func), and
     FusedScaleMaskSoftmax.forward_torch_softmax with a softmax_offset. Compared on inputs with
     no fully masked row (megatron's -10000 fill is not -inf there).
  3. Closed forms: a row of equal logits gives 1/(sk + n) under softmax_n.

Tolerances (TOL below), per dtype of the scores; the kernel computes in fp32 and rounds its result:
  probabilities / clipped probabilities: max |ours - oracle| (absolute; values lie in [0, 1])
      fp32 2e-6,  fp16 1e-3 (about 2 ulp at 1.0),  bf16 8e-3 (about 1 ulp at 1.0)
  gradients w.r.t. scores and sink: max |ours - oracle| / max |oracle| (relative to the largest
  gradient of the tensor)
      fp32 1e-5,  fp16 4e-3,  bf16 3e-2
  (without a clip the backward uses the saved output P, which carries the output dtype's rounding:
  hence fp16/bf16 gradient tolerances of a few ulp of that dtype.) The sink gradient is a sum over
  rows with cancellation, so its relative error has a tail: in bf16, 200 random draws of the
  learnable case gave at most 2.6e-2, and one draw 3.9e-2. Inputs therefore come from fixed seeds
  (stable across processes: zlib.crc32, not hash()), and the 3e-2 bound is a measured one.
Fully masked rows must be exactly zero, with exactly zero gradients, in every dtype.

Everything runs under the Triton interpreter on CPU (set by tests/conftest.py), so shapes are small.
"""

import math
import zlib

import pytest
import torch

from megatron_outeff.ops.reference import causal_mask, outeff_softmax_reference
from megatron_outeff.ops.row_softmax import fused_outeff_softmax
from megatron_outeff.ops.variants import Clip

TOL = {
    torch.float32: dict(out=2e-6, grad=1e-5),
    torch.float16: dict(out=1e-3, grad=4e-3),
    torch.bfloat16: dict(out=8e-3, grad=3e-2),
}
DTYPES = list(TOL)
DTYPE_IDS = ["fp32", "fp16", "bf16"]
CLIP = Clip(gamma=-0.03, zeta=1.03)  # mild: with short rows many p lie either side of the clip


@pytest.fixture(autouse=True)
def _interpreter_tests_need_a_cpu_machine(request):
    """The tests below run the kernel on CPU tensors under the Triton interpreter, which
    tests/conftest.py switches on only without CUDA; on a CUDA machine only the `gpu` tests (compiled,
    on the GPU) and the `slow` sm_90 compile test run here."""
    node = request.node
    if torch.cuda.is_available() and node.get_closest_marker("gpu") is None and node.get_closest_marker("slow") is None:
        pytest.skip("CPU-interpreter test (the gpu-marked tests cover the compiled kernel on this machine)")


def _sink(variant, h):
    """The sink logits a_h of each variant (requires_grad so its gradient is checked too)."""
    if variant == "vanilla":
        return None
    if variant == "softmax1":
        s = torch.zeros(h)
    elif variant == "softmax_n":
        s = torch.full((h,), math.log(3.0))
    elif variant == "learnable":
        s = torch.tensor([8.0, -8.0, 0.5, -1.0] * (h // 4 + 1))[:h]
    else:
        raise AssertionError(variant)
    return s.requires_grad_()


def _mask(kind, b, sq, sk, gen):
    """Masks of each broadcast shape; some contain fully masked rows (handled in the tests)."""
    if kind == "none":
        return None
    if kind == "1,1,sq,sk":  # causal
        return causal_mask(sq, sk, "cpu").view(1, 1, sq, sk)
    if kind == "b,1,sq,sk":  # random, with one fully masked row
        m = torch.rand(b, 1, sq, sk, generator=gen) < 0.4
        m[0, 0, 1, :] = True
        return m
    if kind == "b,1,1,sk":  # key padding: batch 1 keeps its first 5 keys
        m = torch.zeros(b, 1, 1, sk, dtype=torch.bool)
        m[1, :, :, 5:] = True
        return m
    if kind == "sq,sk":  # rank-2 mask, broadcast over b and h
        return torch.rand(sq, sk, generator=gen) < 0.3
    raise AssertionError(kind)


def _err(actual, expected, relative):
    diff = (actual.float() - expected.float()).abs().max().item()
    if relative:
        return diff / max(expected.float().abs().max().item(), 1e-6)
    return diff


def _run_both(scores, *, scale=1.0, sink=None, mask=None, clip=None, max_block_cols=None, seed=0):
    """(ours, oracle) outputs and gradients for a random upstream gradient."""
    kw = {} if max_block_cols is None else dict(max_block_cols=max_block_cols)
    x = scores.detach().clone().requires_grad_()
    s = sink.detach().clone().requires_grad_() if sink is not None else None
    y = fused_outeff_softmax(x, scale=scale, sink=s, mask=mask, clip=clip, **kw)
    assert y.dtype == scores.dtype and y.shape == scores.shape
    gen = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(y.shape, generator=gen).to(device=y.device, dtype=y.dtype)
    inputs = (x, s) if s is not None else (x,)
    grads = torch.autograd.grad(y, inputs, dy)

    xr = scores.detach().float().clone().requires_grad_()
    sr = sink.detach().float().clone().requires_grad_() if sink is not None else None
    yr = outeff_softmax_reference(xr, scale=scale, sink=sr, mask=mask, clip=clip)
    inputs_r = (xr, sr) if sr is not None else (xr,)
    grads_r = torch.autograd.grad(yr, inputs_r, dy.float())
    return (y, *grads), (yr, *grads_r)


def _assert_matches(ours, ref, dtype, what=""):
    tol = TOL[dtype]
    names = ["output", "d scores", "d sink"]
    for i, (a, e) in enumerate(zip(ours, ref)):
        assert torch.isfinite(a.float()).all(), f"{what}: {names[i]} has non-finite values"
        err = _err(a, e, relative=i > 0)
        limit = tol["out"] if i == 0 else tol["grad"]
        assert err <= limit, f"{what}: {names[i]} error {err:.3g} > {limit:g} ({dtype})"


# --------------------------------------------------------------------------------------------
# 1. every variant x clip x mask shape x dtype, forward and backward, vs the reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mask_kind", ["none", "1,1,sq,sk", "b,1,sq,sk", "b,1,1,sk", "sq,sk"])
@pytest.mark.parametrize("clip", [None, CLIP], ids=["noclip", "clip"])
@pytest.mark.parametrize("variant", ["vanilla", "softmax1", "softmax_n", "learnable"])
def test_matches_reference(variant, clip, mask_kind, dtype):
    b, h, sq, sk = 2, 4, 6, 13
    gen = torch.Generator().manual_seed(zlib.crc32(f"{variant}/{mask_kind}".encode()))  # stable across processes
    scores = (torch.randn(b, h, sq, sk, generator=gen) * 4).to(dtype)
    mask = _mask(mask_kind, b, sq, sk, gen)
    ours, ref = _run_both(scores, scale=0.8, sink=_sink(variant, h), mask=mask, clip=clip)
    _assert_matches(ours, ref, dtype, f"{variant}/{mask_kind}")
    if mask is not None:  # masked positions are exact zeros, gradients too
        full = mask.expand(b, h, sq, sk)
        assert (ours[0][full] == 0).all() and (ours[1][full] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_short_rows_and_single_key(dtype):
    """sk = 1 .. 16 (the regime where Softmax_1 and softmax differ most)."""
    for sk in (1, 2, 5, 16):
        for variant in ("vanilla", "softmax1", "learnable"):
            gen = torch.Generator().manual_seed(sk)
            scores = (torch.randn(1, 4, 3, sk, generator=gen) * 2).to(dtype)
            ours, ref = _run_both(scores, sink=_sink(variant, 4), clip=CLIP if sk == 5 else None)
            _assert_matches(ours, ref, dtype, f"sk={sk}/{variant}")


# --------------------------------------------------------------------------------------------
# 2. long rows: the multi-block (online max / sum, then second pass) loop
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("clip", [None, CLIP], ids=["noclip", "clip"])
@pytest.mark.parametrize("variant", ["vanilla", "softmax1", "learnable"])
def test_long_rows_multiblock(variant, clip, dtype):
    b, h, sq, sk = 1, 4, 3, 2000
    gen = torch.Generator().manual_seed(7)
    scores = (torch.randn(b, h, sq, sk, generator=gen) * 3).to(dtype)
    mask = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
    mask[0, 0, 0, :700] = True  # the first column blocks of row 0 are entirely masked
    mask[0, 0, 1, :] = True  # a fully masked row
    mask[0, 0, 2, 1500:] = True  # padding at the end
    sink = _sink(variant, h)
    for mbc in (256, 100):  # 8 blocks of 256; 100 -> blocks of 128 with a ragged last block
        ours, ref = _run_both(scores, scale=0.5, sink=sink, mask=mask, clip=clip, max_block_cols=mbc)
        _assert_matches(ours, ref, dtype, f"sk={sk}/blocks<={mbc}/{variant}")
        assert (ours[0][0, :, 1] == 0).all() and (ours[1][0, :, 1] == 0).all()


def test_sk_16k_default_blocks():
    """sk = 16384 > MAX_BLOCK_COLS: two column blocks with the default configuration."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(1, 1, 2, 16384, generator=gen) * 5
    sink = torch.tensor([1.5]).requires_grad_()
    ours, ref = _run_both(scores, sink=sink, clip=CLIP)
    _assert_matches(ours, ref, torch.float32, "sk=16384")
    ours, ref = _run_both(scores, sink=sink)
    _assert_matches(ours, ref, torch.float32, "sk=16384 noclip")


# --------------------------------------------------------------------------------------------
# 3. fully masked rows, extreme logits, all-very-negative rows, closed forms
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", ["vanilla", "softmax1", "softmax_n", "learnable"])
def test_fully_masked_rows_are_zero(variant, dtype):
    b, h, sq, sk = 1, 4, 2, 9
    scores = torch.randn(b, h, sq, sk).to(dtype)
    mask = torch.ones(1, 1, 1, sk, dtype=torch.bool)
    for clip in (None, CLIP, Clip(0.0, 1.5)):
        for mbc in (None, 4):
            ours, ref = _run_both(scores, sink=_sink(variant, h), mask=mask, clip=clip, max_block_cols=mbc)
            for t in ours:
                assert torch.isfinite(t.float()).all()
                assert (t == 0).all(), f"{variant}/{clip}: expected exact zeros, got {t}"
            _assert_matches(ours, ref, dtype, f"fully masked/{variant}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", ["vanilla", "softmax1", "softmax_n", "learnable"])
def test_extreme_logits(variant, dtype):
    """Logits of +-1e4 (finite in fp16): no overflow, no NaN; all-very-negative rows."""
    b, h, sq, sk = 1, 4, 4, 11
    scores = torch.full((b, h, sq, sk), -1e4)
    scores[:, :, 0, 3] = 1e4  # one huge logit among very negative ones
    scores[:, :, 1, ::2] = 1e4  # several equal huge logits
    scores[:, :, 2] = -1e4  # all very negative: Softmax_1 gives ~0
    scores[:, :, 3] = torch.linspace(-1e4, 1e4, sk)
    scores = scores.to(dtype)
    for clip in (None, CLIP):
        for mbc in (None, 4):
            ours, ref = _run_both(scores, sink=_sink(variant, h), clip=clip, max_block_cols=mbc)
            _assert_matches(ours, ref, dtype, f"extreme/{variant}")
    # all-very-negative row: vanilla is uniform; with a sink >= -8 every probability is 0
    y = fused_outeff_softmax(scores, sink=None if variant == "vanilla" else _sink(variant, h).detach())
    row = y[0, :, 2].float()
    if variant == "vanilla":
        assert torch.allclose(row, torch.full_like(row, 1 / sk), atol=TOL[dtype]["out"])
    else:
        assert (row == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_closed_form_equal_logits(dtype):
    """A row of equal logits gives 1/(sk + n): softmax_n with n = exp(a_h)."""
    sk = 7
    scores = torch.full((1, 3, 2, sk), 0.25).to(dtype)
    sink = torch.tensor([0.0, math.log(3.0), -1e4])  # n = 1, 3, ~0
    y = fused_outeff_softmax(scores, scale=0.0, sink=sink).float()
    expected = torch.tensor([1 / (sk + 1), 1 / (sk + 3), 1 / sk]).view(1, 3, 1, 1).expand_as(y)
    assert _err(y, expected, relative=False) <= TOL[dtype]["out"]
    y = fused_outeff_softmax(scores, scale=1.0).float()
    assert _err(y, torch.full_like(y, 1 / sk), relative=False) <= TOL[dtype]["out"]


def test_noncontiguous_scores_and_no_sink_grad():
    scores = torch.randn(2, 5, 4, 3).transpose(1, 3)  # [2, 3, 4, 5] non-contiguous
    sink = torch.tensor([0.0, 1.0, -1.0])  # no requires_grad: gradient w.r.t. scores only
    ours, ref = _run_both(scores, sink=sink.requires_grad_(False), clip=CLIP)
    _assert_matches(ours[:2], ref[:2], torch.float32, "non-contiguous")


# --------------------------------------------------------------------------------------------
# 4. megatron-core's off-by-one path as an independent oracle
# --------------------------------------------------------------------------------------------
def _mcore_inputs(dtype, gen):
    b, h, sq, sk = 2, 4, 5, 12
    scores = (torch.randn(b, h, sq, sk, generator=gen) * 3).to(dtype)
    mask = causal_mask(sq, sk, "cpu").view(1, 1, sq, sk) | (torch.rand(b, 1, sq, sk, generator=gen) < 0.3)
    mask[..., 0] = False  # no fully masked row: megatron fills -10000, not -inf
    return scores, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("variant", ["softmax1", "learnable"])
def test_matches_megatron_softmax_one(variant, dtype):
    from megatron.core.fusions.fused_softmax import SoftmaxOne

    gen = torch.Generator().manual_seed(11)
    scores, mask = _mcore_inputs(dtype, gen)
    h, scale = scores.shape[1], 0.6
    offset = _sink(variant, h).detach()

    x = scores.detach().clone().requires_grad_()
    off = offset.clone().requires_grad_()
    y = fused_outeff_softmax(x, scale=scale, sink=off, mask=mask)
    dy = torch.randn(y.shape, generator=gen).to(dtype)
    dx, doff = torch.autograd.grad(y, (x, off), dy)

    xm = scores.detach().float().clone().requires_grad_()
    offm = offset.clone().requires_grad_()
    ym = SoftmaxOne(-1, offm)((xm * scale).masked_fill(mask, -10000.0))
    dxm, doffm = torch.autograd.grad(ym, (xm, offm), dy.float())
    _assert_matches((y, dx, doff), (ym, dxm, doffm), dtype, f"megatron SoftmaxOne/{variant}")


def test_matches_megatron_fused_scale_mask_softmax():
    """FusedScaleMaskSoftmax (the path the benchmark times) with a zero softmax_offset."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    gen = torch.Generator().manual_seed(5)
    scores, mask = _mcore_inputs(torch.float32, gen)
    h = scores.shape[1]
    fsm = FusedScaleMaskSoftmax(
        input_in_fp16=False,
        input_in_bf16=False,
        attn_mask_type=AttnMaskType.padding,
        scaled_masked_softmax_fusion=False,
        mask_func=attention_mask_func,
        softmax_in_fp32=True,
        scale=0.6,
    )
    ym = fsm(scores.clone(), mask, softmax_offset=torch.zeros(h))
    y = fused_outeff_softmax(scores, scale=0.6, sink=torch.zeros(h), mask=mask)
    assert _err(y, ym, relative=False) <= TOL[torch.float32]["out"]


# --------------------------------------------------------------------------------------------
# 5. through the attention entry point (impl="rowwise" vs impl="torch")
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("softmax,clip", [("softmax1", None), ("learnable", (-0.05, 1.05)), ("vanilla", None)])
def test_attention_rowwise_matches_torch(softmax, clip):
    from megatron_outeff.ops import outeff_attention

    gen = torch.Generator().manual_seed(2)
    b, sq, sk, h, hkv, d = 2, 5, 7, 4, 2, 8
    q = torch.randn(b, sq, h, d, generator=gen)
    k = torch.randn(b, sk, hkv, d, generator=gen)
    v = torch.randn(b, sk, hkv, d, generator=gen)
    pad = torch.ones(b, sk, dtype=torch.bool)
    pad[1, 4:] = False
    offset = torch.tensor([8.0, -8.0, 0.5, -1.0]) if softmax == "learnable" else None
    outs, grads = [], []
    for impl in ("rowwise", "torch"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        off = offset.clone().requires_grad_() if offset is not None else None
        out = outeff_attention(
            *leaves, softmax=softmax, offset=off, clip=clip, causal=True, key_padding_mask=pad, impl=impl
        )
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
        grads.append(torch.autograd.grad(out, leaves + ([off] if off is not None else []), go))
        outs.append(out)
    assert _err(outs[0], outs[1], relative=True) <= 1e-5
    for a, e in zip(*grads):
        assert _err(a, e, relative=True) <= 1e-5


# --------------------------------------------------------------------------------------------
# 6. bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(scores=torch.randn(3, 4, 5)), r"^scores has rank 3 .*expected rank 4"),
        (dict(sink=torch.zeros(3)), r"^sink shape \(3,\): expected \(2,\)"),
        (
            dict(mask=torch.zeros(1, 1, 4, 6, dtype=torch.bool)),
            r"^mask shape \(1, 1, 4, 6\): expected a shape broadcastable",
        ),
        (
            dict(mask=torch.zeros(3, 1, 1, 5, dtype=torch.bool)),
            r"^mask shape \(3, 1, 1, 5\): expected a shape broadcastable",
        ),
        (dict(mask=torch.zeros(1, 1, 4, 5)), r"^mask dtype torch.float32: expected torch.bool"),
        (dict(scores=torch.zeros(1, 2, 4, 5, dtype=torch.int32)), r"^scores dtype torch.int32: expected"),
        (dict(scale=float("nan")), r"^scale=nan: expected a finite float"),
        (dict(clip=(0.1, 1.0)), r"^clip gamma=0.1: expected gamma <= 0"),
    ],
)
def test_bad_input(kwargs, pattern):
    args = dict(scores=torch.randn(1, 2, 4, 5), scale=1.0, sink=None, mask=None, clip=None)
    args.update(kwargs)
    scores = args.pop("scores")
    with pytest.raises(ValueError, match=pattern) as info:
        fused_outeff_softmax(scores, **args)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# 7. compiled Triton on a GPU (skipped without CUDA): realistic row lengths, single and multi block
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sk", [1000, 4096, 12000])
@pytest.mark.parametrize("clip", [None, CLIP], ids=["noclip", "clip"])
def test_gpu_compiled(sk, clip, dtype):
    dev = torch.device("cuda")
    b, h, sq = 2, 4, 64
    gen = torch.Generator().manual_seed(sk)
    scores = (torch.randn(b, h, sq, sk, generator=gen) * 4).to(dev, dtype)
    mask = causal_mask(sq, sk, dev).view(1, 1, sq, sk) | (torch.rand(b, 1, 1, sk, generator=gen) < 0.1).to(dev)
    mask[1, 0, 0, :] = True
    sink = _sink("learnable", h).detach().to(dev)
    x = scores.clone().requires_grad_()
    s = sink.clone().requires_grad_()
    y = fused_outeff_softmax(x, scale=0.5, sink=s, mask=mask, clip=clip)
    dy = torch.randn(y.shape, generator=gen).to(dev, dtype)
    ours = (y, *torch.autograd.grad(y, (x, s), dy))
    xr = scores.float().clone().requires_grad_()
    sr = sink.clone().requires_grad_()
    yr = outeff_softmax_reference(xr, scale=0.5, sink=sr, mask=mask, clip=clip)
    ref = (yr, *torch.autograd.grad(yr, (xr, sr), dy.float()))
    _assert_matches(ours, ref, dtype, f"gpu sk={sk}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("sk", [1000, 12000])
def test_gpu_extreme_logits(sk, dtype):
    """Compiled, single- and multi-block rows: logits of +-1e4 (finite in fp16) stay finite and match
    the reference; a row of only very negative logits is exactly 0 under every sink >= -8."""
    dev = torch.device("cuda")
    b, h, sq = 1, 4, 6
    gen = torch.Generator().manual_seed(sk)
    scores = torch.full((b, h, sq, sk), -1e4)
    scores[:, :, 0, 3] = 1e4  # one huge logit among very negative ones
    scores[:, :, 1, ::2] = 1e4  # several equal huge logits
    scores[:, :, 2] = -1e4  # all very negative
    scores[:, :, 3] = torch.linspace(-1e4, 1e4, sk)
    scores[:, :, 4:] = torch.randn(b, h, 2, sk, generator=gen) * 1e4
    scores = scores.to(dev, dtype)
    sink = _sink("learnable", h).detach().to(dev)
    for clip in (None, CLIP):
        ours, ref = _run_both(scores, sink=sink, clip=clip)
        _assert_matches(ours, ref, dtype, f"gpu extreme sk={sk} clip={clip}")
    assert (fused_outeff_softmax(scores, sink=sink)[0, :, 2] == 0).all()


# --------------------------------------------------------------------------------------------
# 8. compilation for A100 (sm_80) and H100 / H200 (sm_90) without a GPU: both kernels, single- and
#    multi-block rows, fp16 and bf16, every flag on and every flag off, with the launch the CUDA path
#    makes (row_softmax.forward_launch / backward_launch), specialised on its arguments as Triton's
#    runtime would (16-byte aligned pointers, strides divisible by 16)
# --------------------------------------------------------------------------------------------
_AOT_SCRIPT = """
import json, torch
from megatron_outeff.ops import row_softmax as rs
from megatron_outeff.ops.triton_compile import compile_launch
from megatron_outeff.ops.variants import Clip

facts = []
for dt, sk in (("float16", 1000), ("bfloat16", 12000)):
    x = torch.empty(2, 4, 64, sk, dtype=getattr(torch, dt))
    for on in (True, False):
        sink = torch.empty(4) if on else None
        mask = torch.zeros(2, 1, 64, sk, dtype=torch.bool) if on else None  # megatron's [b, 1, sq, sk]
        clip = Clip(-0.03, 1.0) if on else None
        la, y, rm, rl = rs.forward_launch(x, sink, mask, 0.125, clip, rs.MAX_BLOCK_COLS, False)
        lb = rs.backward_launch(torch.empty_like(x), x if on else y, rm, rl, sink, mask, 0.125, clip,
                                rs.MAX_BLOCK_COLS, on, False)[0]
        facts += compile_launch(la, ARCH, dt) + compile_launch(lb, ARCH, dt)
print("FACTS " + json.dumps([f.as_dict() for f in facts]))
"""


def _check_aot(run_compiled_triton, arch):
    import json

    from megatron_outeff.ops.triton_compile import SHARED_MEMORY_LIMIT

    res = run_compiled_triton(_AOT_SCRIPT.replace("ARCH", str(arch)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    facts = json.loads(next(x for x in res.stdout.splitlines() if x.startswith("FACTS "))[len("FACTS ") :])
    assert sorted(f["kernel"] for f in facts) == ["_bwd_kernel"] * 4 + ["_fwd_kernel"] * 4
    for f in facts:
        where = f"{f['kernel']} sm_{arch} {f['config']} [{f['specialisation']}]"
        assert f["unaligned"] == "", f"{where}: pointers not specialised 16-byte aligned: {f['unaligned']}"
        assert f["shared_bytes"] <= SHARED_MEMORY_LIMIT[arch], where
        assert f["spill_stores"] == f["spill_loads"] == f["stack_bytes"] == 0, f"{where}: register spills"
    # The SASS hash (how tools/triton_compile_report.py --compare shows a refactoring changed no machine code)
    # tells apart every one of these eight kernels: dtype, flags and width all change the code.
    hashes = [f["sass_sha256"] for f in facts]
    assert all(len(h) == 16 and int(h, 16) >= 0 for h in hashes) and len(set(hashes)) == len(facts), hashes


@pytest.mark.slow
def test_kernels_compile_for_sm90(run_compiled_triton):
    """Both row-softmax kernels compile for sm_90 as they will run: within shared memory, no spills."""
    _check_aot(run_compiled_triton, 90)


@pytest.mark.slow
def test_kernels_compile_for_sm80(run_compiled_triton):
    """The same for sm_80 (A100)."""
    _check_aot(run_compiled_triton, 80)
