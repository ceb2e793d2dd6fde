"""Sink attention on torch's fused CUDA kernels (megatron_outeff/ops/sdpa_attention.py), checked without a GPU:

1. the op schemas: the installed torch's schemas of the six CUDA ops (and the CPU pair, and
   torch._fused_sdp_choice) are those the adapters were written against (torch 2.11 = 2.13);
2. meta tensors: every adapter's forward and backward call goes through the real aten ops' dispatcher
   and meta kernels (argument parsing, output layout) for every mask kind, GQA, dropout, head dims
   80 and 72 (padded to 80), with the learnable offset and the gate, in bf16 and fp16;
3. emulated kernels (sdpa_emulation.py: schema-bound, float64 FlashAttention-2 semantics, each op's
   LSE layout and RNG outputs): the whole path (rescale, LSE rows and layout, RNG state to the
   backward, fully masked rows, d a_h = -sum P_sink D) against the float64 oracle of
   test_cpu_attention.py, dropout included (the oracle applies the kernel's own mask);
4. the log-sum-exp base trap (natural log vs log 2; an LSE of unscaled scores);
5. SDPA's choice and its relaxations (causal folded into the bias, GQA expanded), the fallback;
6. the dispatch decision (ops/dispatch.py), a pure function: no unclipped variant goes to Triton on CUDA.
The same code on a GPU: test_sdpa_cuda.py (gpu marker)."""

from __future__ import annotations

import math

import pytest
import torch
from attention_cases import VARIANTS, dout_for
from sdpa_emulation import EmulatedKernels, fake_choice
from test_cpu_attention import FP64_TOL, MASKS, assert_match, dense_mask, make_inputs, oracle_fp64

from megatron_outeff.ops import attention as attention_module
from megatron_outeff.ops import outeff_attention, sdpa_attention
from megatron_outeff.ops.dispatch import MASK_KINDS, auto_impl, fallback_impl, mask_kind, triton_takes_head_dim
from megatron_outeff.ops.sdpa_attention import (
    SDPAUnavailable,
    lse_base,
    lse_for_kernel,
    lse_rows,
    sdpa_outeff_attention,
)
from megatron_outeff.ops.variants import SOFTMAX_VARIANTS, resolve_sink

CUDA_KERNELS = ("flash", "efficient", "cudnn")

# The schemas the adapters call (torch 2.11.0+cu130 and 2.13.0 print exactly these).
SCHEMAS = {
    "_scaled_dot_product_flash_attention": "aten::_scaled_dot_product_flash_attention(Tensor query, Tensor key, Tensor value, float dropout_p=0., bool is_causal=False, bool return_debug_mask=False, *, float? scale=None) -> (Tensor output, Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, SymInt max_k, Tensor rng_state, Tensor unused, Tensor debug_attn_mask)",
    "_scaled_dot_product_flash_attention_backward": "aten::_scaled_dot_product_flash_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, Tensor philox_seed, Tensor philox_offset, *, float? scale=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)",
    "_scaled_dot_product_cudnn_attention": "aten::_scaled_dot_product_cudnn_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., bool is_causal=False, bool return_debug_mask=False, *, float? scale=None) -> (Tensor output, Tensor logsumexp, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, SymInt max_k, Tensor philox_seed, Tensor philox_offset, Tensor debug_attn_mask)",
    "_scaled_dot_product_cudnn_attention_backward": "aten::_scaled_dot_product_cudnn_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor logsumexp, Tensor philox_seed, Tensor philox_offset, Tensor attn_bias, Tensor cum_seq_q, Tensor cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, *, float? scale=None) -> (Tensor, Tensor, Tensor)",
    "_scaled_dot_product_efficient_attention": "aten::_scaled_dot_product_efficient_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., bool is_causal=False, *, float? scale=None) -> (Tensor output, Tensor log_sumexp, Tensor philox_seed, Tensor philox_offset)",
    "_scaled_dot_product_efficient_attention_backward": "aten::_scaled_dot_product_efficient_attention_backward(Tensor grad_out_, Tensor query, Tensor key, Tensor value, Tensor attn_bias, Tensor out, Tensor logsumexp, Tensor philox_seed, Tensor philox_offset, float dropout_p, bool[4] grad_input_mask, bool is_causal=False, *, float? scale=None) -> (Tensor, Tensor, Tensor, Tensor)",
    "_scaled_dot_product_flash_attention_for_cpu": "aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, Tensor value, float dropout_p=0., bool is_causal=False, *, Tensor? attn_mask=None, float? scale=None) -> (Tensor output, Tensor logsumexp)",
    "_scaled_dot_product_flash_attention_for_cpu_backward": "aten::_scaled_dot_product_flash_attention_for_cpu_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor logsumexp, float dropout_p, bool is_causal, *, Tensor? attn_mask=None, float? scale=None) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)",
    "_fused_sdp_choice": "aten::_fused_sdp_choice(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, float dropout_p=0., bool is_causal=False, *, float? scale=None, bool enable_gqa=False) -> int",
}


@pytest.fixture
def emulated(monkeypatch):
    """The six CUDA ops replaced by their float64 emulations; the LSE-base cache emptied."""
    emu = EmulatedKernels()
    monkeypatch.setattr(sdpa_attention, "_aten", emu)
    monkeypatch.setattr(sdpa_attention, "_LSE_BASE", {})
    return emu


def run_kernel(leaves, kw, kernel, dout, dropout_p=0.0):
    """sdpa_outeff_attention forced onto ``kernel``: (out, grads)."""
    xs = {n: t.detach().clone().requires_grad_(True) for n, t in leaves.items()}
    q = xs["q"]
    sink = resolve_sink(kw["softmax"], kw.get("n", 1.0), xs.get("offset"), q.shape[2], q.device)
    out = sdpa_outeff_attention(
        q,
        xs["k"],
        xs["v"],
        scale=1.0 / math.sqrt(q.shape[-1]),
        sink=sink,
        gate=xs.get("gate"),
        causal=kw.get("causal", False),
        key_padding_mask=kw.get("key_padding_mask"),
        mask=kw.get("mask"),
        dropout_p=dropout_p,
        kernel=kernel,
    )
    out.backward(dout.to(out.dtype))
    return out.detach(), {n: t.grad for n, t in xs.items()}


# ------------------------------------------------------------------------------------------------
# 1. the schemas
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_op_schemas_are_the_ones_called(op):
    """A torch whose schema differs (an argument added, moved or renamed) fails here before a GPU
    would fail at run time; then update the adapter in sdpa_attention.py and this snapshot."""
    assert str(getattr(torch.ops.aten, op).default._schema) == SCHEMAS[op]


# ------------------------------------------------------------------------------------------------
# 2. meta tensors through the real ops
# ------------------------------------------------------------------------------------------------
META_CASES = {
    "causal": dict(causal=True),
    "none": dict(),
    "pad": dict(pad=True),
    "causal_pad": dict(causal=True, pad=True),
    "causal_sq<sk": dict(causal=True, sk=56),
    "dense": dict(dense=True),
    "gqa": dict(causal=True, h_kv=2),
    "dropout": dict(causal=True, dropout=0.1),
    "d72": dict(causal=True, d=72),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(META_CASES))
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_meta_calls_through_the_real_ops(kernel, case, dtype):
    """Forward and backward on meta tensors: the aten dispatcher parses every argument the adapter
    passes and the ops' meta kernels give their real output layouts (LSE shapes included)."""
    c = dict(META_CASES[case])
    b, sq, h, d = 2, 40, 4, c.get("d", 80)
    sk, h_kv = c.get("sk", sq), c.get("h_kv", h)
    takes_bias = kernel != "flash"
    needs_bias = c.get("pad") or c.get("dense") or sk != sq
    meta = dict(device="meta", dtype=dtype, requires_grad=True)
    q, k, v = torch.empty(b, sq, h, d, **meta), torch.empty(b, sk, h_kv, d, **meta), torch.empty(b, sk, h_kv, d, **meta)
    offset = torch.empty(h, device="meta", requires_grad=True)
    gate = torch.empty(b, sq, h, device="meta", dtype=dtype, requires_grad=True)
    kpm = torch.ones(b, sk, dtype=torch.bool, device="meta") if c.get("pad") else None
    dense = torch.zeros(b, 1, sq, sk, dtype=torch.bool, device="meta") if c.get("dense") else None
    args = dict(
        scale=d**-0.5,
        sink=offset.float(),
        gate=gate,
        causal=c.get("causal", False),
        key_padding_mask=kpm,
        mask=dense,
        dropout_p=c.get("dropout", 0.0),
        kernel=kernel,
    )
    if needs_bias and not takes_bias:
        with pytest.raises(SDPAUnavailable, match="takes no bias"):
            sdpa_outeff_attention(q, k, v, **args)
        return
    out = sdpa_outeff_attention(q, k, v, **args)
    assert out.shape == (b, sq, h, d) and out.dtype == dtype and out.device.type == "meta"
    out.backward(torch.empty_like(out))
    for t in (q, k, v, offset, gate):
        assert t.grad is not None and t.grad.shape == t.shape, (t.shape, None if t.grad is None else t.grad.shape)


# ------------------------------------------------------------------------------------------------
# 3. emulated kernels against the float64 oracle
# ------------------------------------------------------------------------------------------------
EMU_CASES = [
    (k, v, m) for k in CUDA_KERNELS for v in VARIANTS for m in MASKS if not (v == "vanilla" and m == "causal_pad_sq>sk")
]


@pytest.mark.parametrize("kernel,variant,mask", EMU_CASES, ids=[f"{k}-{v}-{m}" for k, v, m in EMU_CASES])
def test_emulated_kernels_against_definition(emulated, kernel, variant, mask):
    """Every variant x mask x kernel (GQA 2:1, gated, learnable offsets +-8), forward and every gradient.
    The flash kernel takes no bias: key padding and causal with sq != sk are refused (SDPA's choice
    never gives it such a call)."""
    m = MASKS[mask]
    leaves, kw = make_inputs(sq=m["sq"], sk=m["sk"], variant=variant, pad=m["pad"])
    kw["causal"] = m["causal"]
    dout = dout_for(leaves)
    if kernel == "flash" and (m["pad"] or m["sq"] != m["sk"]):
        with pytest.raises(SDPAUnavailable, match="takes no bias"):
            run_kernel(leaves, kw, kernel, dout)
        return
    out, grads = run_kernel(leaves, kw, kernel, dout)
    ref, ref_grads = oracle_fp64(leaves, kw, dout)
    assert_match(out, grads, ref, ref_grads, FP64_TOL, leaves)
    assert set(emulated.calls) == {kernel}


@pytest.mark.parametrize("kernel", ["efficient", "cudnn"])
@pytest.mark.parametrize("variant", ["softmax_n2.5", "learnable"])
def test_emulated_dense_mask_with_causal_and_padding(emulated, kernel, variant):
    """A dense mask (rows it masks entirely included) combined with causal and key padding."""
    leaves, kw = make_inputs(sq=9, sk=11, variant=variant, pad=True)
    mask = dense_mask(2, 9, 11)
    mask[0, 0, 4] = True
    kw.update(causal=True, mask=mask)
    dout = dout_for(leaves)
    out, grads = run_kernel(leaves, kw, kernel, dout)
    ref, ref_grads = oracle_fp64(leaves, kw, dout)
    assert (out[0, 4] == 0).all() and (grads["q"][0, 4] == 0).all()
    assert_match(out, grads, ref, ref_grads, FP64_TOL, leaves)


@pytest.mark.parametrize("h_kv", [1, 4])
@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_emulated_gqa(emulated, kernel, h_kv):
    """GQA: native in the flash and cuDNN kernels, K/V expanded for the memory-efficient one (its
    emulation refuses unequal heads, as the kernel does)."""
    leaves, kw = make_inputs(sq=9, sk=9, h=4, h_kv=h_kv, variant="learnable")
    kw["causal"] = True
    dout = dout_for(leaves)
    out, grads = run_kernel(leaves, kw, kernel, dout)
    ref, ref_grads = oracle_fp64(leaves, kw, dout)
    assert_match(out, grads, ref, ref_grads, FP64_TOL, leaves)


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
@pytest.mark.parametrize("variant", ["vanilla", "softmax1", "learnable"])
def test_emulated_dropout_through_the_kernels_rng(emulated, kernel, variant):
    """Dropout on P commutes with the per-row sink rescale: the forward's philox seed / offset go to the
    backward, which redraws the very mask (the emulation keeps it; the oracle applies it)."""
    leaves, kw = make_inputs(sq=12, sk=12, variant=variant)
    kw["causal"] = True
    dout = dout_for(leaves)
    out, grads = run_kernel(leaves, kw, kernel, dout, dropout_p=0.3)
    keep = emulated.masks[max(emulated.masks)]
    assert keep.float().mean() < 0.85  # dropout really happened
    ref, ref_grads = oracle_fp64(leaves, kw, dout, drop=(keep, 0.3))
    assert_match(out, grads, ref, ref_grads, FP64_TOL, leaves)


@pytest.mark.parametrize("kernel", CUDA_KERNELS)
def test_emulated_head_dim_padding(emulated, kernel):
    """Head dims that are not a multiple of 8 (OPT's 80 is one; 12 is not) are zero-padded for torch's
    CUDA kernels with the scale kept: the same result as the definition, gradients sliced back."""
    leaves, kw = make_inputs(sq=9, sk=9, d=12, variant="learnable")
    kw["causal"] = True
    dout = dout_for(leaves)
    out, grads = run_kernel(leaves, kw, kernel, dout)
    ref, ref_grads = oracle_fp64(leaves, kw, dout)
    assert out.shape[-1] == 12
    assert_match(out, grads, ref, ref_grads, FP64_TOL, leaves)


# ------------------------------------------------------------------------------------------------
# 4. the log-sum-exp: natural log vs log 2, its shape per kernel
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lse_base_trap_cpu_kernel_returns_the_natural_log(dtype):
    """torch's fused CPU kernel (the one impl='auto' runs on CPU) returns L = ln sum_j exp(scale q.k_j):
    checked against torch.logsumexp, and not log2 (which would be L / ln 2)."""
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 2, 8, 16, generator=gen).to(dtype) for _ in range(2))
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False, scale=0.25)
    natural = torch.logsumexp(0.25 * q.double() @ k.double().transpose(-1, -2), dim=-1)
    tol = 1e-10 if dtype == torch.float64 else 5e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(lse.double(), natural, atol=tol, rtol=tol)
    assert (lse.double() - natural / math.log(2.0)).abs().max() > 0.1
    assert lse_base("cpu_flash", torch.device("cpu"), dtype) == 1.0


def test_lse_base_trap_base2_kernel_is_converted(emulated):
    """A kernel whose LSE is in base 2 (reported once for FlexAttention's flash backend): found by the
    first-call probe and converted both ways, so the sink result stays exact."""
    emulated.lse_base = 2.0
    leaves, kw = make_inputs(sq=9, sk=9, variant="learnable")
    kw["causal"] = True
    dout = dout_for(leaves)
    out, grads = run_kernel(leaves, kw, "cudnn", dout)
    assert sdpa_attention._LSE_BASE[("cudnn", "cpu", torch.float64)] == pytest.approx(math.log(2.0))
    ref, ref_grads = oracle_fp64(leaves, kw, dout)
    assert_match(out, grads, ref, ref_grads, FP64_TOL, leaves)


def test_lse_base_trap_is_real(emulated, monkeypatch):
    """The negative control: the same base-2 kernel with the probe's answer ignored (natural log
    assumed) gives a wrong result, so the test above can fail."""
    emulated.lse_base = 2.0
    monkeypatch.setattr(sdpa_attention, "lse_base", lambda *a: 1.0)
    leaves, kw = make_inputs(sq=9, sk=9, variant="softmax1")
    dout = dout_for(leaves)
    out, _ = run_kernel(leaves, kw, "flash", dout)
    ref, _ = oracle_fp64(leaves, kw, dout)
    assert (out - ref).abs().max() > 1e-2


def test_lse_probe_refused_by_the_kernel_warns_and_assumes_natural(emulated, monkeypatch):
    """A kernel with a shape limit of its own that refuses the tiny probe: the call goes on (natural log
    assumed, which the GPU check's test_sdpa_cuda.py measures for every real kernel), with a warning."""
    real = emulated._scaled_dot_product_cudnn_attention

    def picky(*args, **kwargs):
        if args[0].shape[2] == 16:
            raise RuntimeError("cuDNN: sequence length 16 not supported (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(emulated, "_scaled_dot_product_cudnn_attention", picky)
    leaves, kw = make_inputs(sq=9, sk=9, variant="learnable")
    dout = dout_for(leaves)
    with pytest.warns(RuntimeWarning, match="refused the log-sum-exp probe"):
        out, grads = run_kernel(leaves, kw, "cudnn", dout)
    ref, ref_grads = oracle_fp64(leaves, kw, dout)
    assert_match(out, grads, ref, ref_grads, FP64_TOL, leaves)


def test_lse_of_unscaled_scores_is_refused(emulated):
    """An LSE in neither convention (here: of the unscaled scores) stops the call with the reason."""
    emulated.lse_unscaled = True
    leaves, kw = make_inputs(sq=9, sk=9, variant="softmax1")
    with pytest.raises(RuntimeError, match="natural log of the scaled scores"):
        run_kernel(leaves, kw, "efficient", dout_for(leaves))


def test_lse_layouts_per_kernel():
    """flash / CPU: [b, h, sq]; memory-efficient: [b, h, ceil(sq / 32) * 32] (rows past sq are padding);
    cuDNN: [b, h, sq, 1]. lse_rows gives [b, h, sq]; lse_for_kernel puts new rows back in the kernel's
    layout, padding untouched."""
    rows = torch.arange(2 * 3 * 40, dtype=torch.float32).view(2, 3, 40)
    padded = torch.full((2, 3, 64), float("inf"))
    padded[..., :40] = rows
    for lse in (rows, padded, rows.unsqueeze(-1)):
        assert torch.equal(lse_rows(lse, 40), rows)
        back = lse_for_kernel(lse, rows + 1)
        assert back.shape == lse.shape and torch.equal(lse_rows(back, 40), rows + 1)
    assert torch.isinf(lse_for_kernel(padded, rows)[..., 40:]).all()


# ------------------------------------------------------------------------------------------------
# 5. SDPA's choice, relaxed where it said no
# ------------------------------------------------------------------------------------------------
def _meta_qkv(b=2, sq=32, sk=32, h=4, h_kv=4, d=64):
    m = dict(device="meta", dtype=torch.bfloat16, requires_grad=True)
    return torch.empty(b, sq, h, d, **m), torch.empty(b, sk, h_kv, d, **m), torch.empty(b, sk, h_kv, d, **m)


def test_choice_is_sdpas_and_recorded(monkeypatch):
    """No relaxation needed: one call of torch._fused_sdp_choice with enable_gqa for GQA; its answer runs
    and is recorded (what the benchmarks and the GPU check report)."""
    choice = fake_choice(lambda *a: 3)
    monkeypatch.setattr(torch, "_fused_sdp_choice", choice)
    sdpa_attention.sdpa_backend_record(reset=True)
    q, k, v = _meta_qkv(h_kv=2)
    sdpa_outeff_attention(q, k, v, scale=0.125, causal=True).sum().backward()
    assert [(c.heads, c.gqa, c.causal) for c in choice.calls] == [((4, 2), True, True)]
    assert sdpa_attention.sdpa_backend_record() == {"last": "cudnn", "counts": {"cudnn": 1}}


def test_choice_relaxations(monkeypatch):
    """A kernel that takes neither GQA nor causal together with a bias (rules of the fake choice): the
    causal mask is folded into the bias, then K/V expanded; the memory-efficient kernel then runs."""

    def rules(q, k, v, mask, p, causal, gqa):
        return 0 if (k.shape[1] != q.shape[1] or (causal and mask is not None)) else 2

    choice = fake_choice(rules)
    monkeypatch.setattr(torch, "_fused_sdp_choice", choice)
    sdpa_attention.sdpa_backend_record(reset=True)
    q, k, v = _meta_qkv(h_kv=2)
    kpm = torch.ones(2, 32, dtype=torch.bool, device="meta")
    sdpa_outeff_attention(q, k, v, scale=0.125, causal=True, key_padding_mask=kpm).sum().backward()
    assert [(c.heads, c.causal, c.result) for c in choice.calls] == [
        ((4, 2), True, 0),
        ((4, 4), True, 0),
        ((4, 2), False, 0),
        ((4, 4), False, 2),
    ]
    assert sdpa_attention.sdpa_backend_record()["last"] == "efficient+causal_in_bias+expanded_kv"
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_no_fused_kernel_raises_with_what_was_tried(monkeypatch):
    monkeypatch.setattr(torch, "_fused_sdp_choice", fake_choice(lambda *a: 0))
    q, k, v = _meta_qkv(h_kv=2)
    with pytest.raises(SDPAUnavailable, match=r"no fused CUDA attention kernel .*K/V expanded, choice 0"):
        sdpa_outeff_attention(q, k, v, scale=0.125, causal=True)


def test_auto_falls_back_with_one_warning(monkeypatch):
    """When the fused kernels say no at run time, impl='auto' warns once, records the fallback and runs
    fallback_impl's choice (on CPU: the reference)."""

    def unavailable(*a, **kw):
        raise SDPAUnavailable("no fused kernel (test)")

    monkeypatch.setattr(attention_module, "sdpa_outeff_attention", unavailable)
    monkeypatch.setattr(sdpa_attention, "_WARNED", set())
    q = torch.randn(1, 8, 2, 16)
    with pytest.warns(RuntimeWarning, match=r"no fused kernel \(test\); running impl='torch'"):
        out = outeff_attention(q, q, q, causal=True)
    torch.testing.assert_close(out, outeff_attention(q, q, q, causal=True, impl="torch"))
    assert sdpa_attention.sdpa_backend_record()["last"] == "fallback:torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outeff_attention(q, q, q, causal=True)  # the second time: no warning


@pytest.mark.parametrize("shape", [(0, 4, 4), (1, 0, 4), (1, 4, 0)], ids=["b0", "sq0", "sk0"])
def test_empty_inputs(shape):
    """No batch, no query or no key: an empty (or, without keys, all-zero) output and zero gradients; the
    CPU kernel itself dies of a division by zero (SIGFPE) on sq = 0."""
    b, sq, sk = shape
    q = torch.randn(b, sq, 2, 8, requires_grad=True)
    k = torch.randn(b, sk, 2, 8, requires_grad=True)
    out = outeff_attention(q, k, k, softmax="softmax1", causal=False)
    assert out.shape == (b, sq, 2, 8) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all() and (k.grad == 0).all()


def test_forced_sdpa_refusals():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="clip with impl='sdpa'"):
        outeff_attention(q, q, q, impl="sdpa", clip=(-0.03, 1.0))
    with pytest.raises(ValueError, match="impl='sdpa': dropout_p=0.1: torch's fused CPU kernel has no RNG state"):
        outeff_attention(q, q, q, impl="sdpa", dropout_p=0.1)


def test_forced_sdpa_on_cpu_is_the_cpu_path():
    leaves, kw = make_inputs(sq=9, sk=9, variant="learnable")
    kw["causal"] = True
    xs = {n: t.clone() for n, t in leaves.items()}
    a = outeff_attention(xs["q"], xs["k"], xs["v"], offset=xs["offset"], gate=xs["gate"], impl="sdpa", **kw)
    b = outeff_attention(xs["q"], xs["k"], xs["v"], offset=xs["offset"], gate=xs["gate"], impl="cpu", **kw)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# 6. the dispatch decision
# ------------------------------------------------------------------------------------------------
HEAD_DIMS = (16, 32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256)
FUSED = (torch.float16, torch.bfloat16, torch.float32)


@pytest.mark.parametrize("softmax", SOFTMAX_VARIANTS)
def test_unclipped_cuda_never_goes_to_triton(softmax):
    """Every unclipped variant on CUDA, fp16 / bf16 / fp32, every head dim torch's kernels take (80:
    OPT-2.7b), every mask kind, with and without dropout: torch's fused kernels ("sdpa")."""
    for dtype in FUSED:
        for d in HEAD_DIMS:
            for kind in MASK_KINDS:
                for dropout in (False, True):
                    got = auto_impl("cuda", softmax, False, dropout, dtype, d, kind)
                    assert got == "sdpa", (softmax, dtype, d, kind, dropout, got)


def test_dispatch_table():
    bf16 = torch.bfloat16
    assert auto_impl("cuda", "softmax1", True, False, bf16, 64, "causal") == "triton"
    assert auto_impl("cuda", "softmax1", True, True, bf16, 64, "causal") == "rowwise"
    assert auto_impl("cuda", "learnable", True, False, bf16, 64, "dense") == "rowwise"
    expected = "triton" if triton_takes_head_dim(80) else "rowwise"
    assert auto_impl("cuda", "softmax1", True, False, bf16, 80, "causal") == expected
    assert auto_impl("cuda", "softmax1", False, False, torch.float64, 64, "causal") == "torch"
    assert auto_impl("cuda", "softmax1", False, False, bf16, 512, "causal") == "rowwise"
    assert auto_impl("cpu", "softmax1", False, False, torch.float32, 64, "causal") == "sdpa"
    assert auto_impl("cpu", "vanilla", True, False, torch.float32, 64, "dense") == "cpu"
    assert auto_impl("cpu", "softmax1", False, True, torch.float32, 64, "causal") == "torch"
    assert auto_impl("mps", "softmax1", False, False, torch.float32, 64, "causal") == "torch"
    assert fallback_impl("cuda", False, bf16, 64, "causal") == "triton"
    assert fallback_impl("cuda", True, bf16, 64, "causal") == "rowwise"
    assert fallback_impl("cpu", False, torch.float32, 64, "causal") == "torch"
    with pytest.raises(ValueError, match="mask_kind='sliding'"):
        auto_impl("cuda", "softmax1", False, False, bf16, 64, "sliding")


def test_mask_kind():
    kpm, dense = torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    assert [
        mask_kind(False, None, None),
        mask_kind(True, None, None),
        mask_kind(False, kpm, None),
        mask_kind(True, kpm, None),
        mask_kind(True, kpm, dense),
    ] == list(MASK_KINDS)
