"""Fused flash attention (Triton) for every outlier-efficient softmax variant, forward and backward.

One kernel family covers vanilla softmax, Softmax_1, softmax_n and a learnable per-head offset
(all are "a sink logit a_h added to the normaliser"), optionally with clipped probabilities and a
per-head output gate. Nothing of size [sq, sk] is ever written to memory.

Math (natural-log units; the kernels work in base 2 with qk_scale = scale * log2(e)):

forward, no clip (online softmax, FlashAttention-2 with the sink as the initial state)
    m = a_h, l = 1, acc = 0                 (vanilla: m = -inf, l = 0)
    per key block:  s = q k^T * scale (masked -> -inf);  m' = max(m, rowmax s)
                    l = l * e^(m - m') + rowsum e^(s - m');  acc = acc * e^(m - m') + e^(s - m') v
    O = acc / l,    L = m + log l           (the true log-normaliser, sink included)
    A row with no visible key and no sink: O = 0, L = +inf (so every recomputed P is exactly 0).
forward, clipped: pass 1 over K computes L; pass 2 computes O = sum_j clamp(c P_j + gamma, 0, 1) v_j
    with c = zeta - gamma and P_j = e^(s_j - L).
gate: O_gated = O * gate[b, i, h], fused into the epilogue.

backward (dO_u = dOut * gate is the gradient w.r.t. the ungated output)
    P = e^(S - L);  dP = dO_u V^T
    no clip:  D = rowsum(dO_u * O);                     dS = P * (dP - D)
    clip:     dP' = c * 1[0 <= c P + gamma <= 1] * dP;   D' = rowsum(P * dP') (own pass over K);
              dS = P * (dP' - D');                        dV uses the clipped probabilities
    dQ = scale * dS K,  dK = scale * dS^T Q,  dV = Y^T dO_u (Y = P or its clipped version)
    d(sink_h) = - sum_{b, rows} e^(a_h - L) * D   (D' when clipped)
    d(gate)   = rowsum(dOut * O)
GQA: kv head j serves query heads j*g .. j*g+g-1; dK/dV accumulate over those heads inside the kernel.
Kernels: forward; backward preprocessing (D and d(gate), one row per lane); dQ (over query blocks),
whose CLIP_DELTA specialisation is the clipped softmax's D' pass (run before dQ); dK/dV (over key
blocks, looping over the query heads of the group). No atomics: deterministic. The query-block
prologue, the dO load and the score block (q k^T, scale, mask, exp2) are @triton.jit helpers of this
file; the online-softmax step and the clip with its derivative are shared with row_softmax.py
(_triton_common.py). Helpers are inlined and their tl.constexpr flags resolved at compile time.

Block sizes: _config (32 x 32 under the interpreter; 128 x 64 forward, 64 x 64 / 64 x 32 / 32 x 64
backward on CUDA, not yet tuned on hardware). OUTEFF_FLASH_BLOCKS="BM,BN" overrides all kernels.

Precision: loads are upcast to fp32 under the Triton interpreter (CPU); on CUDA fp16/bf16 operands
go to tl.dot natively with fp32 accumulation, and fp32 inputs use input_precision="ieee" (no TF32).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._triton_common import clip_grad, clip_probs, interpreting, online_softmax_step
from .variants import Clip

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


# --------------------------------------------------------------------------------------------
# Blocks shared by the kernels. Tensors are [b, s, h, d] with a unit d stride; a kernel gets the
# other strides of each as one tuple (b, s, h) (for the gate [b, sq, h], its three strides).
# The Triton interpreter (the CPU tests) re-patches triton.language on every call of a @triton.jit
# helper, which costs more than a tile load: the helpers are few and call no other helper.
# --------------------------------------------------------------------------------------------


@triton.jit
def _query_block(Q, stride_q, H, GROUP, SQ, SK,
                 CAUSAL: tl.constexpr, DOT_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program over one query block (grid (cdiv(sq, BLOCK_M), b * H)): its flat (batch, head)
    index, batch (int64: b * stride may exceed 2^31), query head, kv head (GQA group), query rows,
    q tile, and the end of the keys it sees (sk; causal, bottom-right aligned: up to its last row's)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bi = (pid_bh // H).to(tl.int64)
    hi = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = tl.load(Q + bi * stride_q[0] + hi * stride_q[2] + offs_m[:, None] * stride_q[1] + tl.arange(0, BLOCK_D)[None, :],
                mask=(offs_m < SQ)[:, None], other=0.0).to(DOT_T)
    hi_n = SK
    if CAUSAL:
        hi_n = tl.minimum((pid_m + 1) * BLOCK_M + SK - SQ, SK)
    return pid_bh, bi, hi, hi // GROUP, offs_m, q, hi_n


@triton.jit
def _load_do(DO, Gate, stride_o, stride_g, bi, hi, offs_m, offs_d, SQ, HAS_GATE: tl.constexpr, DOT_T: tl.constexpr):
    """dOut rows -> gradient w.r.t. the ungated output (dOut * gate), as the dot operand type."""
    row_ok = offs_m < SQ
    do = tl.load(DO + bi * stride_o[0] + hi * stride_o[2] + offs_m[:, None] * stride_o[1] + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(Gate + bi * stride_g[0] + hi * stride_g[2] + offs_m * stride_g[1], mask=row_ok, other=0.0)
        do = do * g.to(tl.float32)[:, None]
    return do.to(DOT_T)


@triton.jit
def _score_block(q, k, lse2, offs_m, offs_n, SQ, SK, kpm_row, qk_scale,
                 CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, PREC: tl.constexpr, NORMALISED: tl.constexpr):
    """The score block of query rows offs_m and keys offs_n [BLOCK_M, BLOCK_N]: base-2 logits
    s = q k^T * qk_scale, -inf where the query may not see the key (outside sq / sk, the bottom-right
    aligned causal mask: key j <= i + sk - sq, key padding). NORMALISED: P = 2^(s - lse2) instead,
    exactly 0 there, from the base-2 log-normaliser lse2 [BLOCK_M] (unused otherwise).
    Returns (s or P, the validity mask)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    valid = (offs_m[:, None] < SQ) & (offs_n[None, :] < SK)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (SK - SQ))
    if HAS_KPM:
        kp = tl.load(kpm_row + offs_n, mask=offs_n < SK, other=0)
        valid = valid & (kp != 0)[None, :]
    if NORMALISED:
        s = tl.exp2(tl.where(valid, s - lse2[:, None], float("-inf")))
    else:
        s = tl.where(valid, s, float("-inf"))
    return s, valid


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, OutU, Lse, Sink, Gate, Kpm,
    stride_q, stride_k, stride_v, stride_o, stride_g, stride_kpmb,
    H, GROUP, SQ, SK,
    qk_scale, clip_c, clip_gamma,
    HAS_SINK: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_GATE: tl.constexpr,
    SAVE_UNGATED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_T: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, bi, hi, hk, offs_m, q, hi_n = _query_block(Q, stride_q, H, GROUP, SQ, SK, CAUSAL, DOT_T, BLOCK_M, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + bi * stride_k[0] + hk * stride_k[2]
    v_base = V + bi * stride_v[0] + hk * stride_v[2]
    kpm_row = Kpm + bi * stride_kpmb

    if HAS_SINK:
        a2 = tl.load(Sink + hi).to(tl.float32) * 1.4426950408889634
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + a2
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # pass 1 (and the only pass without clipping): online softmax
    for start_n in range(0, hi_n, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < SK
        k = tl.load(k_base + offs_n[:, None] * stride_k[1] + offs_d[None, :], mask=col_ok[:, None], other=0.0).to(DOT_T)
        s, _ = _score_block(q, k, m_i, offs_m, offs_n, SQ, SK, kpm_row, qk_scale, CAUSAL, HAS_KPM, PREC, False)
        m_i, l_i, alpha, p = online_softmax_step(m_i, l_i, s, True)
        if not HAS_CLIP:
            v = tl.load(v_base + offs_n[:, None] * stride_v[1] + offs_d[None, :], mask=col_ok[:, None], other=0.0).to(DOT_T)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_T), v, input_precision=PREC)

    has_mass = l_i > 0.0
    lse2 = tl.where(has_mass, m_i + tl.log2(tl.where(has_mass, l_i, 1.0)), float("inf"))

    if HAS_CLIP:
        # pass 2: clipped probabilities against the final normaliser
        for start_n in range(0, hi_n, BLOCK_N):
            offs_n = start_n + offs_n0
            col_ok = offs_n < SK
            k = tl.load(k_base + offs_n[:, None] * stride_k[1] + offs_d[None, :], mask=col_ok[:, None], other=0.0).to(DOT_T)
            p, valid = _score_block(q, k, lse2, offs_m, offs_n, SQ, SK, kpm_row, qk_scale, CAUSAL, HAS_KPM, PREC, True)
            y = tl.where(valid, clip_probs(p, clip_c, clip_gamma), 0.0)
            v = tl.load(v_base + offs_n[:, None] * stride_v[1] + offs_d[None, :], mask=col_ok[:, None], other=0.0).to(DOT_T)
            acc += tl.dot(y.to(DOT_T), v, input_precision=PREC)
        o = acc
    else:
        o = acc / tl.where(has_mass, l_i, 1.0)[:, None]

    row_ok = offs_m < SQ
    tl.store(Lse + pid_bh * SQ + offs_m, lse2, mask=row_ok)
    o_off = bi * stride_o[0] + hi * stride_o[2] + offs_m[:, None] * stride_o[1] + offs_d[None, :]
    if HAS_GATE:
        if SAVE_UNGATED:
            tl.store(OutU + o_off, o.to(OutU.dtype.element_ty), mask=row_ok[:, None])
        g = tl.load(Gate + bi * stride_g[0] + hi * stride_g[2] + offs_m * stride_g[1], mask=row_ok, other=0.0)
        o = o * g.to(tl.float32)[:, None]
    tl.store(Out + o_off, o.to(Out.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, Gate, Delta, DGate,
    stride_o, stride_do, stride_g,
    H, SQ,
    HAS_GATE: tl.constexpr, O_UNGATED: tl.constexpr, STORE_DELTA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Per row t = rowsum(dOut * O). O ungated (gate needs a gradient): d(gate) = t, D = t * gate.
    O is the returned output otherwise (gated or not): D = t. D goes to [b, h, sq], d(gate) to [b, sq, h]."""
    pid_bh = tl.program_id(1)
    bi = (pid_bh // H).to(tl.int64)
    hi = pid_bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < SQ
    o = tl.load(O + bi * stride_o[0] + hi * stride_o[2] + offs_m[:, None] * stride_o[1] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + bi * stride_do[0] + hi * stride_do[2] + offs_m[:, None] * stride_do[1] + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    t = tl.sum(o * do, 1)
    delta = t
    if HAS_GATE:
        if O_UNGATED:
            tl.store(DGate + (bi * SQ + offs_m) * H + hi, t, mask=row_ok)
            g = tl.load(Gate + bi * stride_g[0] + hi * stride_g[2] + offs_m * stride_g[1], mask=row_ok, other=0.0)
            delta = t * g.to(tl.float32)
    if STORE_DELTA:
        tl.store(Delta + pid_bh * SQ + offs_m, delta, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, Gate, Kpm, DQ,
    stride_q, stride_k, stride_v, stride_o, stride_g, stride_kpmb, stride_dq,
    H, GROUP, SQ, SK,
    qk_scale, sm_scale, clip_c, clip_gamma,
    CLIP_DELTA: tl.constexpr, HAS_CLIP: tl.constexpr, HAS_GATE: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr, DOT_T: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One query block, over the key blocks: dQ = scale * dS K, dS = P * (dP' - D) (dP' = dP without
    clipping). CLIP_DELTA (clipped softmax, a pass before dQ): D' = rowsum(P * dP') to Delta instead,
    dP' = c * 1[0 <= c P + gamma <= 1] * (dO_u V^T); DQ is not touched."""
    pid_bh, bi, hi, hk, offs_m, q, hi_n = _query_block(Q, stride_q, H, GROUP, SQ, SK, CAUSAL, DOT_T, BLOCK_M, BLOCK_D)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < SQ
    do = _load_do(DO, Gate, stride_o, stride_g, bi, hi, offs_m, offs_d, SQ, HAS_GATE, DOT_T)
    lse2 = tl.load(Lse + pid_bh * SQ + offs_m, mask=row_ok, other=float("inf"))
    k_base = K + bi * stride_k[0] + hk * stride_k[2]
    v_base = V + bi * stride_v[0] + hk * stride_v[2]
    kpm_row = Kpm + bi * stride_kpmb
    if CLIP_DELTA:
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        delta = tl.load(Delta + pid_bh * SQ + offs_m, mask=row_ok, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, hi_n, BLOCK_N):
        offs_n = start_n + offs_n0
        col_ok = offs_n < SK
        k = tl.load(k_base + offs_n[:, None] * stride_k[1] + offs_d[None, :], mask=col_ok[:, None], other=0.0).to(DOT_T)
        v = tl.load(v_base + offs_n[:, None] * stride_v[1] + offs_d[None, :], mask=col_ok[:, None], other=0.0).to(DOT_T)
        p, _ = _score_block(q, k, lse2, offs_m, offs_n, SQ, SK, kpm_row, qk_scale, CAUSAL, HAS_KPM, PREC, True)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if HAS_CLIP:
            _, dp = clip_grad(p, dp, clip_c, clip_gamma)
        if CLIP_DELTA:
            acc += tl.sum(p * dp, 1)
        else:
            ds = p * (dp - delta[:, None])
            acc += tl.dot(ds.to(DOT_T), k, input_precision=PREC)
    if CLIP_DELTA:
        tl.store(Delta + pid_bh * SQ + offs_m, acc, mask=row_ok)
    else:
        dq = acc * sm_scale
        tl.store(DQ + bi * stride_dq[0] + hi * stride_dq[2] + offs_m[:, None] * stride_dq[1] + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, Gate, Kpm, DK, DV,
    stride_q, stride_k, stride_v, stride_o, stride_g, stride_kpmb, stride_dk,
    H, H_KV, GROUP, SQ, SK,
    qk_scale, sm_scale, clip_c, clip_gamma,
    HAS_CLIP: tl.constexpr, HAS_GATE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_T: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One key block of one kv head, over the query blocks of every query head of its group."""
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    bi = (pid_bhk // H_KV).to(tl.int64)
    hk = pid_bhk % H_KV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < SK
    k = tl.load(K + bi * stride_k[0] + hk * stride_k[2] + offs_n[:, None] * stride_k[1] + offs_d[None, :],
                mask=col_ok[:, None], other=0.0).to(DOT_T)
    v = tl.load(V + bi * stride_v[0] + hk * stride_v[2] + offs_n[:, None] * stride_v[1] + offs_d[None, :],
                mask=col_ok[:, None], other=0.0).to(DOT_T)
    kpm_row = Kpm + bi * stride_kpmb
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    lo_m = 0
    if CAUSAL:
        # key j is seen by queries i >= j - (sk - sq)
        lo_m = tl.maximum(pid_n * BLOCK_N - (SK - SQ), 0)
        lo_m = (lo_m // BLOCK_M) * BLOCK_M

    for hi in range(hk * GROUP, hk * GROUP + GROUP):
        bh = bi * H + hi
        q_base = Q + bi * stride_q[0] + hi * stride_q[2]
        for start_m in range(lo_m, SQ, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < SQ
            q = tl.load(q_base + offs_m[:, None] * stride_q[1] + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(DOT_T)
            do = _load_do(DO, Gate, stride_o, stride_g, bi, hi, offs_m, offs_d, SQ, HAS_GATE, DOT_T)
            lse2 = tl.load(Lse + bh * SQ + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(Delta + bh * SQ + offs_m, mask=row_ok, other=0.0)
            p, valid = _score_block(q, k, lse2, offs_m, offs_n, SQ, SK, kpm_row, qk_scale, CAUSAL, HAS_KPM, PREC, True)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            if HAS_CLIP:
                y, dp = clip_grad(p, dp, clip_c, clip_gamma)
                y = tl.where(valid, y, 0.0)
            else:
                y = p
            dv += tl.dot(tl.trans(y.to(DOT_T)), do, input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(DOT_T)), q, input_precision=PREC)
    dk = dk * sm_scale
    off = bi * stride_dk[0] + hk * stride_dk[2] + offs_n[:, None] * stride_dk[1] + offs_d[None, :]
    tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------


def _config(d: int, interp: bool) -> dict:
    """Block sizes / warps. Small blocks under the interpreter (CPU); FA2-like defaults on CUDA."""
    env = os.environ.get("OUTEFF_FLASH_BLOCKS")  # "BM,BN" override, for tests and tuning
    if env:
        bm, bn = (int(x) for x in env.split(","))
        return dict(fwd=(bm, bn), dq=(bm, bn), dkdv=(bm, bn), warps=4, stages=2)
    if interp:
        return dict(fwd=(32, 32), dq=(32, 32), dkdv=(32, 32), warps=4, stages=1)
    if d <= 64:
        return dict(fwd=(128, 64), dq=(64, 64), dkdv=(64, 64), warps=4, stages=2)
    return dict(fwd=(128, 64), dq=(64, 32), dkdv=(32, 64), warps=8, stages=2)


def _dot_types(dtype: torch.dtype, interp: bool):
    if interp:
        # the interpreter mishandles bf16 blocks: upcast every load to fp32
        return tl.float32, "ieee"
    return _TORCH_TO_TL[dtype], "ieee"


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


def _launch_common(q, k, gate, kpm, causal):
    """What every kernel launch of one call shares: (b, sq, h, d, sk, h_kv), the block config, the
    launch meta-parameters, the gate and the key-padding mask with their strides (absent: a dummy
    pointer, never read, and zero strides)."""
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    interp = interpreting(q.device)
    cfg = _config(d, interp)
    dot_t, prec = _dot_types(q.dtype, interp)
    meta = dict(HAS_GATE=gate is not None, CAUSAL=causal, HAS_KPM=kpm is not None, DOT_T=dot_t, PREC=prec,
                BLOCK_D=d, num_warps=cfg["warps"], num_stages=cfg["stages"])
    gate_args = (gate, gate.stride()) if gate is not None else (q, (0, 0, 0))
    kpm_args = (kpm, kpm.stride(0)) if kpm is not None else (q, 0)
    return (b, sq, h, d, sk, h_kv), cfg, meta, gate_args, kpm_args


def _strides(t: torch.Tensor):
    """The (batch, seq, head) strides of a [b, s, h, d] tensor, one kernel argument."""
    return t.stride()[:3]


class _FlashOutEffAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, gate, kpm, scale, clip_gamma, clip_zeta, has_clip, causal):
        (b, sq, h, d, sk, h_kv), cfg, meta, (gate_arg, g_strides), (kpm_arg, kpm_stride) = _launch_common(
            q, k, gate, kpm, causal)
        has_sink = sink is not None
        clip_c = float(clip_zeta - clip_gamma) if has_clip else 1.0
        clip_g = float(clip_gamma) if has_clip else 0.0

        out = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
        save_ungated = gate is not None and ctx.needs_input_grad[4]
        # the ungated output, kept in fp32 for d(gate) = rowsum(dOut * O)
        out_u = torch.empty(out.shape, dtype=torch.float32, device=q.device) if save_ungated else out
        lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
        sink_arg = sink.detach().contiguous() if has_sink else lse

        bm, bn = cfg["fwd"]
        _fwd_kernel[(triton.cdiv(sq, bm), b * h)](
            q, k, v, out, out_u, lse, sink_arg, gate_arg, kpm_arg,
            _strides(q), _strides(k), _strides(v), _strides(out), g_strides, kpm_stride,
            h, h // h_kv, sq, sk, scale * LOG2E, clip_c, clip_g,
            HAS_SINK=has_sink, HAS_CLIP=has_clip, SAVE_UNGATED=save_ungated, BLOCK_M=bm, BLOCK_N=bn, **meta,
        )
        ctx.save_for_backward(q, k, v, sink if has_sink else None, gate, kpm, out_u if save_ungated else out, lse)
        ctx.cfg = (scale, clip_c, clip_g, has_clip, causal, save_ungated)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, sink, gate, kpm, o_saved, lse = ctx.saved_tensors
        scale, clip_c, clip_g, has_clip, causal, save_ungated = ctx.cfg
        (b, sq, h, d, sk, h_kv), cfg, meta, (gate_arg, g_strides), (kpm_arg, kpm_stride) = _launch_common(
            q, k, gate, kpm, causal)
        dout = _last_dim_contiguous(dout)
        # the arguments every kernel below shares, up to the output strides
        common = (_strides(q), _strides(k), _strides(v), _strides(dout), g_strides, kpm_stride)
        scales = (scale * LOG2E, scale, clip_c, clip_g)

        # D = rowsum(dO_u * O) and d(gate) (FlashAttention-2's preprocessing); clipped: D' below.
        delta = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
        dgate = torch.empty((b, sq, h), dtype=torch.float32, device=q.device) if save_ungated else None
        bm, bn = cfg["dq"]
        if save_ungated or not has_clip:
            _bwd_preprocess_kernel[(triton.cdiv(sq, bm), b * h)](
                o_saved, dout, gate_arg, delta, dgate if save_ungated else delta,
                _strides(o_saved), _strides(dout), g_strides, h, sq,
                HAS_GATE=meta["HAS_GATE"], O_UNGATED=save_ungated, STORE_DELTA=not has_clip,
                BLOCK_M=bm, BLOCK_D=d, num_warps=cfg["warps"],
            )
        if has_clip:  # D' = rowsum(P * dP'): the dQ kernel's loop, writing Delta
            _bwd_dq_kernel[(triton.cdiv(sq, bm), b * h)](
                q, k, v, dout, lse, delta, gate_arg, kpm_arg, delta, *common, (0, 0, 0),
                h, h // h_kv, sq, sk, *scales,
                CLIP_DELTA=True, HAS_CLIP=True, BLOCK_M=bm, BLOCK_N=bn, **meta,
            )

        dq = None
        if ctx.needs_input_grad[0]:
            dq = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
            _bwd_dq_kernel[(triton.cdiv(sq, bm), b * h)](
                q, k, v, dout, lse, delta, gate_arg, kpm_arg, dq, *common, _strides(dq),
                h, h // h_kv, sq, sk, *scales,
                CLIP_DELTA=False, HAS_CLIP=has_clip, BLOCK_M=bm, BLOCK_N=bn, **meta,
            )
        dk = torch.zeros((b, sk, h_kv, d), dtype=k.dtype, device=k.device)
        dv = torch.zeros((b, sk, h_kv, d), dtype=v.dtype, device=v.device)
        bm, bn = cfg["dkdv"]
        if sk > 0 and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            _bwd_dkdv_kernel[(triton.cdiv(sk, bn), b * h_kv)](
                q, k, v, dout, lse, delta, gate_arg, kpm_arg, dk, dv, *common, _strides(dk),
                h, h_kv, h // h_kv, sq, sk, *scales,
                HAS_CLIP=has_clip, BLOCK_M=bm, BLOCK_N=bn, **meta,
            )

        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            # d a_h = - sum_{b, rows} exp(a_h - L) * D  (lse is stored in base 2)
            p_sink = torch.exp2(sink.detach().float().view(1, h, 1) * LOG2E - lse)
            dsink = -(p_sink * delta).sum(dim=(0, 2))
        if dgate is not None:
            dgate = dgate.to(gate.dtype) if ctx.needs_input_grad[4] else None
        if not ctx.needs_input_grad[1]:
            dk = None
        if not ctx.needs_input_grad[2]:
            dv = None
        return dq, dk, dv, dsink, dgate, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def flash_outeff_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sink: Optional[torch.Tensor],
    clip: Optional[Clip],
    gate: Optional[torch.Tensor],
    causal: bool,
    key_padding_mask: Optional[torch.Tensor],
) -> torch.Tensor:
    """Flash attention for all outlier-efficient variants; q [b, sq, h, d], k/v [b, sk, h_kv, d].

    Arguments are validated by ``outeff_attention``; this adds the kernel's own limits (head dim,
    dtype). Returns [b, sq, h, d] in q's dtype. Differentiable w.r.t. q, k, v, sink and gate.
    """
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim={d}: impl='triton' supports head dims {SUPPORTED_HEAD_DIMS} (powers of two); use impl='torch'")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype}: impl='triton' supports float16, bfloat16 and float32; use impl='torch'")
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    if b == 0 or sq == 0 or h == 0:
        return torch.zeros((b, sq, h, d), dtype=q.dtype, device=q.device) + 0 * q.sum()
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if sink is not None:
        sink = sink.float()
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.int8).contiguous()
    has_clip = clip is not None
    return _FlashOutEffAttention.apply(
        q, k, v, sink, gate, kpm, float(scale),
        float(clip.gamma) if has_clip else 0.0, float(clip.zeta) if has_clip else 1.0,
        has_clip, bool(causal),
    )
