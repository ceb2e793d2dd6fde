"""Sink attention on torch's fused CUDA kernels (ops/sdpa_attention.py) on a GPU (`gpu` marker: skipped
without CUDA; run by the GPU check, tools/gpu/run.sh).

Each kernel (flash, memory-efficient, cuDNN) is pinned with torch.nn.attention.sdpa_kernel, as a
user would pin SDPA, and compared with the reference on fp32 copies of the same inputs at the
tolerances of the Triton kernel's GPU tests (GPU_TOL: bf16 4e-2, fp16 5e-3 / 1e-2); a kernel that
torch does not offer for a case on this GPU is skipped with the reason (impl='auto' must still find
a fused kernel for it: test_auto_never_falls_back). Dropout: the vanilla variant draws exactly
SDPA's mask (same op, same RNG state), and Softmax_1's output and gradients equal those of
SDPA's dropout output times sigmoid(logsumexp) under the same seed."""

from __future__ import annotations

import math

import pytest
import torch
from attention_cases import assert_all_close, dout_for, run_attention
from test_cpu_attention import make_inputs

from megatron_outeff.ops import outeff_attention, sdpa_attention

pytestmark = pytest.mark.gpu

# the Triton kernel's GPU tolerances (tests/ops/test_flash_attention.py: fp16/bf16 operands, fp32 accumulation)
GPU_TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-3),
    torch.float16: dict(atol=5e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=4e-2, rtol=4e-2),
}

KERNELS = ("flash", "efficient", "cudnn")


def _backend(kernel):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[kernel]


def cuda_inputs(**kw):
    return make_inputs(device="cuda", **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_lse_is_the_natural_log(kernel, dtype, monkeypatch):
    """The base trap on the real kernels: each kernel's LSE is ln sum exp of the scaled scores (measured
    afresh: the cache emptied; a kernel that refuses the probe is skipped, not assumed)."""
    import warnings

    monkeypatch.setattr(sdpa_attention, "_LSE_BASE", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        try:
            base = sdpa_attention.lse_base(kernel, torch.device("cuda"), dtype, 128)
        except RuntimeWarning as e:
            pytest.skip(f"torch's {kernel} kernel does not run here: {e}")
    assert base == 1.0


CASES = [  # (variant, d, dtype, mask, h_kv)
    ("softmax1", 128, torch.bfloat16, "causal", 4),
    ("learnable", 128, torch.bfloat16, "causal", 2),
    ("learnable", 80, torch.bfloat16, "causal", 4),  # OPT-2.7b's head dim
    ("softmax_n2.5", 64, torch.float16, "causal", 1),
    ("vanilla", 64, torch.bfloat16, "pad", 4),
    ("learnable", 64, torch.float16, "causal_pad", 2),
    ("softmax1", 72, torch.bfloat16, "causal_sq>sk", 4),  # padded head dim, rows with no key
]


def _case_inputs(variant, d, dtype, mask, h_kv):
    sq, sk = (320, 200) if mask == "causal_sq>sk" else (256, 256)
    leaves, kw = cuda_inputs(
        b=2,
        sq=sq,
        sk=sk,
        h=4,
        h_kv=h_kv,
        d=d,
        dtype=dtype,
        variant=variant,
        gate=True,
        pad=mask in ("pad", "causal_pad"),
    )
    kw["causal"] = mask != "pad"
    return leaves, kw


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-d{c[1]}-{str(c[2])[6:]}-{c[3]}-kv{c[4]}" for c in CASES])
def test_pinned_kernel_against_reference(kernel, case):
    leaves, kw = _case_inputs(*case)
    dtype = case[2]
    dout = dout_for(leaves)
    sdpa_attention.sdpa_backend_record(reset=True)
    with torch.nn.attention.sdpa_kernel([_backend(kernel)]):
        try:
            out, grads = run_attention(leaves, kw, "sdpa", dout)
        except ValueError as e:
            if "no fused CUDA attention kernel" not in str(e):
                raise
            pytest.skip(f"torch offers no {kernel} kernel for this case here")
    assert sdpa_attention.sdpa_backend_record()["last"].split("+")[0] == kernel
    ref, ref_grads = run_attention(leaves, kw, "torch", dout.float(), upcast=True)
    assert_all_close(out, grads, ref, ref_grads, leaves, GPU_TOL[dtype])
    if case[3] == "causal_sq>sk":
        assert (out[:, :120] == 0).all() and (grads["q"][:, :120] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-d{c[1]}-{str(c[2])[6:]}-{c[3]}-kv{c[4]}" for c in CASES])
def test_auto_never_falls_back(case):
    """impl='auto' runs every unclipped case on one of torch's fused kernels (never Triton, never the
    row path), as SDPA chooses; the kernel that ran is recorded."""
    leaves, kw = _case_inputs(*case)
    dout = dout_for(leaves)
    sdpa_attention.sdpa_backend_record(reset=True)
    run_attention(leaves, kw, "auto", dout)
    rec = sdpa_attention.sdpa_backend_record()
    assert rec["last"].split("+")[0] in KERNELS, rec


@pytest.mark.parametrize("kernel", ["flash", "efficient"])
def test_dropout_vanilla_is_sdpas_own(kernel):
    """The vanilla variant with dropout calls the very op SDPA calls with the same RNG state: the same
    output and gradients as F.scaled_dot_product_attention under the same seed."""
    leaves, kw = cuda_inputs(
        b=2, sq=256, sk=256, h=4, h_kv=4, d=64, dtype=torch.bfloat16, variant="vanilla", gate=False
    )
    q, k, v = (leaves[n].detach().clone().requires_grad_(True) for n in "qkv")
    dout = torch.randn_like(q)
    sdpa_attention.lse_base(kernel, q.device, q.dtype)  # the first-call probe, before the seed
    with torch.nn.attention.sdpa_kernel([_backend(kernel)]):
        torch.manual_seed(7)
        ours = outeff_attention(q, k, v, softmax="vanilla", causal=True, dropout_p=0.2, impl="sdpa")
        ours.backward(dout)
        g_ours = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        torch.manual_seed(7)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.2, is_causal=True
        ).transpose(1, 2)
        ref.backward(dout)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)  # the same mask, the same kernel
    for a, b in zip(g_ours, (q.grad, k.grad, v.grad)):  # (atomics: not bitwise)
        torch.testing.assert_close(a, b, **GPU_TOL[torch.bfloat16])


@pytest.mark.parametrize("kernel", ["flash", "efficient"])
def test_dropout_softmax1_is_the_rescaled_sdpa(kernel):
    """Softmax_1 with dropout = SDPA's dropout output * sigmoid(logsumexp of the scaled scores), under the
    same seed: output and gradients (the right side differentiated by autograd, LSE in fp32)."""
    leaves, kw = cuda_inputs(
        b=1, sq=256, sk=256, h=4, h_kv=4, d=64, dtype=torch.bfloat16, variant="softmax1", gate=False
    )
    dout = torch.randn(leaves["q"].shape, device="cuda", dtype=torch.bfloat16)

    def rescaled_sdpa(q, k, v):
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, dropout_p=0.2, is_causal=True)
        s = (qt.float() @ kt.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        return (o.float() * torch.sigmoid(torch.logsumexp(s, -1)).unsqueeze(-1)).transpose(1, 2)

    results = []
    sdpa_attention.lse_base(kernel, dout.device, dout.dtype)
    with torch.nn.attention.sdpa_kernel([_backend(kernel)]):
        for f in (
            lambda q, k, v: outeff_attention(q, k, v, softmax="softmax1", causal=True, dropout_p=0.2, impl="sdpa"),
            rescaled_sdpa,
        ):
            xs = [leaves[n].detach().clone().requires_grad_(True) for n in "qkv"]
            torch.manual_seed(11)
            out = f(*xs)
            out.backward(dout.to(out.dtype))
            results.append((out.float(), [t.grad.float() for t in xs]))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, **GPU_TOL[torch.bfloat16])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **GPU_TOL[torch.bfloat16])
