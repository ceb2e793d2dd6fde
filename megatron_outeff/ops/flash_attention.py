"""Fused flash attention (Triton) for every outlier-efficient softmax variant, forward and backward.

One kernel family covers vanilla softmax, Softmax_1, softmax_n and a learnable per-head offset
(all are "a sink logit a_h added to the normaliser"), optionally with clipped probabilities and a
per-head output gate. Nothing of size [sq, sk] is ever written to memory. On CUDA, unclipped sink
variants normally run torch's own fused kernels (``impl="sdpa"``); these kernels serve what needs our
math (the clip, two passes) and whatever torch's kernels cannot serve.

Math (natural-log units; the kernels work in base 2 with qk_scale = scale * log2(e)):

forward, no clip (online softmax, FlashAttention-2 with the sink as the initial state)
    m = a_h, l = 1, acc = 0                 (vanilla: m = -inf, l = 0)
    per key tile:   s = q k^T * scale (masked -> -inf);  m' = max(m, rowmax s)
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

Structure (FlashAttention-2; Dao 2023, and the Triton fused-attention tutorial):
- forward: one program per (batch x head, query tile), query tiles on the matrix instructions' M
  dimension; the key loop is split into full tiles (every query row sees every key: no mask is
  computed) and masked tiles (the causal diagonal, bottom-right aligned, and the last partial key
  tile). Causal programs start with the longest rows.
- backward: the dK/dV kernel has one program per (batch x kv head, key tile) with the keys on the
  M dimension and loops over the query tiles of every query head of its GQA group: S^T = K Q^T,
  dP^T = V dO^T, dV += P^T dO, dK += dS^T Q (4 products). dQ comes from a second pass with the query
  rows on M (``_bwd_dq_kernel``: S, dP, dQ += dS K; 128-row query tiles on CUDA, two Hopper
  warpgroups), 7 products in all, deterministic. FlashAttention-2's 5 (dQ += dS K inside the dK/dV
  kernel, added into an fp32 buffer with atomics) is the ATOMIC_DQ specialisation, selected with
  ``OUTEFF_FLASH_DQ=atomic``; why it is not the default: ``DEFAULT_DQ_MODE``. The clip's D' needs
  the whole row before any dS, so clipped backwards run the second pass's loop once more first
  (CLIP_DELTA: 2 products).
- masks only on diagonal tiles: every loop over tiles is written once as a @triton.jit block
  (``_fwd_tiles``, ``_dq_tiles``, ``_dkdv_tiles``) that walks the full tiles (MASK=False) and the
  masked ones (MASK=True) as a ``tl.static_range`` over the two (unrolled at compile time: one
  specialised loop each); key padding, a data mask, applies to every tile.
- batch x heads and the tiles of one head fold into grid axis 0 (tiles of one head adjacent, so
  they share K/V in L2); axis 0 holds 2^31 - 1 programs (axes 1 and 2: 65535).
- 64-bit offsets: the batch, head and tile-start offsets are int64 scalars; inside a tile the
  offsets (row * sequence stride + column) are int32 tensors, which ``tile_addressable`` guarantees
  (a view whose sequence stride times the largest tile passes 2^31 runs on a contiguous copy). So
  strided views past 2^31 elements (megatron's views of the fused QKV output) address correctly.
  (Loop-carried pointer tensors are avoided: each holds a 64-bit register per element, 128 registers
  per 64 x 128 tile at 8 warps, and spilled every backward config.)
- head dims: BLOCK_D is the next power of two, at least 64 (at most 128); a head dim below it (80
  for OPT-2.7b, 96, 32, ...) is padded with masked (zero) columns (PAD_D).
- precision: fp16/bf16 operands go to the matrix instructions natively with fp32 accumulation;
  fp32 inputs use TF32 products (10-bit mantissa, fp32 accumulation: the precision torch gives fp32
  matmuls with allow_tf32), the softmax state stays fp32. Under the Triton interpreter (CPU) every
  load is upcast to fp32 (its bf16 blocks are unreliable) and products are exact fp32.
- tiles: ``kernel_configs`` gives a small candidate set per (kernel, head dim, dtype, causal,
  architecture), 3-4 pipeline stages; CUDA launches autotune among them (per sequence-length
  bucket, ``triton.autotune``); the interpreter and ahead-of-time compiles take them
  deterministically. ``OUTEFF_FLASH_AUTOTUNE=0`` pins the first candidate.

Every launch is described by a ``KernelLaunch`` (``forward_launches`` / ``backward_launches``),
which the autograd Function runs and ``megatron_outeff.ops.triton_compile`` compiles ahead of time
with the very arguments (pointer alignment, strides) the launcher passes.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._triton_common import KernelLaunch, clip_grad, clip_probs, online_softmax_step, run_launch
from .triton_env import interpreting
from .variants import Clip

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
MIN_BLOCK_D = 64
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GRID_AXIS0_LIMIT = 2**31 - 1

_TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def supports_head_dim(head_dim: int) -> bool:
    """Whether the flash kernel takes this head dim (1..128; below a power of two it is padded)."""
    return 1 <= int(head_dim) <= MAX_HEAD_DIM


def unsupported_reason(dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """None when ``flash_outeff_attention`` serves (dtype, head_dim), else why not (one line)."""
    if not supports_head_dim(head_dim):
        return f"head_dim={head_dim}: impl='triton' supports head dims 1..{MAX_HEAD_DIM}"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype}: impl='triton' supports float16, bfloat16 and float32"
    return None


def block_d(head_dim: int) -> int:
    """The kernels' head-dim tile: the next power of two, at least 64 (extra columns are masked)."""
    return max(MIN_BLOCK_D, triton.next_power_of_2(int(head_dim)))


# --------------------------------------------------------------------------------------------
# @triton.jit blocks. Tensors are [b, s, h, d] with a unit d stride; a kernel gets the other strides
# of each as one tuple (b, s, h) (for the gate [b, sq, h], its three strides). Under the Triton
# interpreter (the CPU tests) every call of a helper re-patches triton.language (~5 tile ops), so
# helpers are called per loop, not per tile, except the shared softmax / clip steps.
# --------------------------------------------------------------------------------------------


@triton.jit
def _program_tile(SEQ, HEADS, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid axis 0 -> (batch x head, batch (int64), head, tile index) for tiles of BLOCK rows of a sequence
    of SEQ (the tiles of one head adjacent). REVERSE: the last tile first (causal: the longest rows first)."""
    num = tl.cdiv(SEQ, BLOCK)
    pid = tl.program_id(0)
    bh = pid // num
    pid_t = pid % num
    if REVERSE:
        pid_t = num - 1 - pid_t
    return bh, (bh // HEADS).to(tl.int64), bh % HEADS, pid_t


@triton.jit
def _tile_rows(start, SEQ, HEAD_D, PAD_D: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rows [start, start + BLOCK) of a sequence of SEQ and the head-dim columns: (offs, offs_d, ok,
    ok_d), ok [BLOCK] the rows < SEQ, ok_d [BLOCK, BLOCK_D] those rows and, with PAD_D, the columns < HEAD_D."""
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ok = offs < SEQ
    ok_d = ok[:, None]
    if PAD_D:
        ok_d = ok_d & (offs_d[None, :] < HEAD_D)
    return offs, offs_d, ok, ok_d


@triton.jit
def _head_rows(X, strides, b, head, rows):
    """Pointers to the positions ``rows`` of (batch b, head) of X [b, s, h(, d)] with strides (b, s, h), in
    int64 (b: int64)."""
    return X + b * strides[0] + head.to(tl.int64) * strides[2] + rows.to(tl.int64) * strides[1]


@triton.jit
def _load_tile(X, strides, b, head, rows, offs_d, mask):
    """The tile X[b, rows, head, offs_d] (rows [BLOCK, 1]), 0 where not ``mask``."""
    return tl.load(_head_rows(X, strides, b, head, rows) + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _key_range(m0, SQ, SK, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles of the query rows [m0, m0 + BLOCK_M): [0, n_full) are visible to every row (no
    mask), [n_full, n_end) are masked: the causal diagonal (bottom-right aligned: row i sees key
    j <= i + SK - SQ) and the last, partial key tile."""
    n_whole = (SK // BLOCK_N) * BLOCK_N
    if CAUSAL:
        seen_by_first = tl.maximum(m0 + SK - SQ + 1, 0)  # keys [0, this) are visible to row m0 and later
        n_full = tl.minimum((seen_by_first // BLOCK_N) * BLOCK_N, n_whole)
        n_end = tl.maximum(tl.minimum(m0 + BLOCK_M + SK - SQ, SK), n_full)
    else:
        n_full = n_whole
        n_end = SK
    return n_full, n_end


@triton.jit
def _fwd_tiles(
    acc,
    m_i,
    l_i,
    q,
    K_head,
    V_head,
    kpm_row,
    n_full,
    n_end,
    offs_m,
    sk_n,
    sv_n,
    SQ,
    SK,
    HEAD_D,
    lse2,
    qk_scale,
    clip_c,
    clip_gamma,
    CLIP_PASS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The key tiles of one query block (forward): [0, n_full) without masks, then [n_full, n_end),
    which straddle the causal diagonal or the end of the keys (``_key_range``). K_head / V_head: the kv
    head's key 0; sk_n / sv_n: the sequence strides of K / V (tile starts in int64, offsets inside a
    tile in int32: ``tile_addressable``). Pass 1 (not CLIP_PASS): the online softmax state (m_i, l_i),
    and acc += p v unless HAS_CLIP. CLIP_PASS: acc += clip(2^(s - lse2)) v, lse2 the final base-2
    log-normaliser of pass 1."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # loop-invariant int32 offsets inside a tile; each step starts from a scalar int64 offset (no
    # loop-carried pointer tensors: those hold a 64-bit register per element)
    k_tile = offs_n0[:, None] * sk_n + offs_d[None, :]
    v_tile = offs_n0[:, None] * sv_n + offs_d[None, :]
    d_ok = offs_d[None, :] < HEAD_D
    for MASK in tl.static_range(2):  # the tiles every row sees in full, then the masked ones
        lo = n_full if MASK else 0
        hi = n_end if MASK else n_full
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            start = tl.cast(start_n, tl.int64)
            k_ptrs = K_head + start * sk_n + k_tile
            v_ptrs = V_head + start * sv_n + v_tile
            if MASK:
                kv_ok = offs_n[:, None] < SK
                if PAD_D:
                    kv_ok = kv_ok & d_ok
                k = tl.load(k_ptrs, mask=kv_ok, other=0.0).to(DOT_T)
            elif PAD_D:
                k = tl.load(k_ptrs, mask=d_ok, other=0.0).to(DOT_T)
            else:
                k = tl.load(k_ptrs).to(DOT_T)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            if MASK:
                valid = offs_n[None, :] < SK
                if CAUSAL:
                    valid = valid & (offs_n[None, :] <= offs_m[:, None] + (SK - SQ))
            if HAS_KPM:
                kp = tl.load(kpm_row + offs_n, mask=offs_n < SK, other=0) != 0
                if MASK:
                    valid = valid & kp[None, :]
                else:
                    valid = kp[None, :]
            if CLIP_PASS:
                p = tl.exp2(s - lse2[:, None])
                if MASK or HAS_KPM:
                    p = tl.where(valid, p, 0.0)
                p = clip_probs(p, clip_c, clip_gamma)  # clip(0) = 0: gamma <= 0
            else:
                if MASK or HAS_KPM:
                    s = tl.where(valid, s, float("-inf"))
                m_i, l_i, alpha, p = online_softmax_step(m_i, l_i, s, True)
                if not HAS_CLIP:
                    acc = acc * alpha[:, None]
            if CLIP_PASS or not HAS_CLIP:
                if MASK:
                    v = tl.load(v_ptrs, mask=kv_ok, other=0.0).to(DOT_T)
                elif PAD_D:
                    v = tl.load(v_ptrs, mask=d_ok, other=0.0).to(DOT_T)
                else:
                    v = tl.load(v_ptrs).to(DOT_T)
                acc += tl.dot(p.to(DOT_T), v, input_precision=PREC)
    return acc, m_i, l_i


@triton.jit
def _dq_tiles(
    acc,
    q,
    do,
    lse2,
    delta,
    K_head,
    V_head,
    kpm_row,
    n_full,
    n_end,
    offs_m,
    sk_n,
    sv_n,
    SQ,
    SK,
    HEAD_D,
    qk_scale,
    clip_c,
    clip_gamma,
    CLIP_DELTA: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The key tiles of one query block, [0, n_full) then the masked [n_full, n_end) (backward, queries
    on M): acc += dS K (unscaled), dS = P * (dP' - D); CLIP_DELTA: acc += rowsum(P * dP') instead (the
    clipped softmax's D')."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_tile = offs_n0[:, None] * sk_n + offs_d[None, :]  # as in _fwd_tiles
    v_tile = offs_n0[:, None] * sv_n + offs_d[None, :]
    d_ok = offs_d[None, :] < HEAD_D
    for MASK in tl.static_range(2):  # as in _fwd_tiles
        lo = n_full if MASK else 0
        hi = n_end if MASK else n_full
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            start = tl.cast(start_n, tl.int64)
            k_ptrs = K_head + start * sk_n + k_tile
            v_ptrs = V_head + start * sv_n + v_tile
            if MASK:
                kv_ok = offs_n[:, None] < SK
                if PAD_D:
                    kv_ok = kv_ok & d_ok
                k = tl.load(k_ptrs, mask=kv_ok, other=0.0).to(DOT_T)
                v = tl.load(v_ptrs, mask=kv_ok, other=0.0).to(DOT_T)
            elif PAD_D:
                k = tl.load(k_ptrs, mask=d_ok, other=0.0).to(DOT_T)
                v = tl.load(v_ptrs, mask=d_ok, other=0.0).to(DOT_T)
            else:
                k = tl.load(k_ptrs).to(DOT_T)
                v = tl.load(v_ptrs).to(DOT_T)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            p = tl.exp2(s - lse2[:, None])
            if MASK:
                valid = offs_n[None, :] < SK
                if CAUSAL:
                    valid = valid & (offs_n[None, :] <= offs_m[:, None] + (SK - SQ))
                p = tl.where(valid, p, 0.0)
            if HAS_KPM:
                kp = tl.load(kpm_row + offs_n, mask=offs_n < SK, other=0) != 0
                p = tl.where(kp[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            if HAS_CLIP:
                _, dp = clip_grad(p, dp, clip_c, clip_gamma)
            if CLIP_DELTA:
                acc += tl.sum(p * dp, 1)
            else:
                ds = p * (dp - delta[:, None])
                acc += tl.dot(ds.to(DOT_T), k, input_precision=PREC)
    return acc


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    key_ok,
    offs_n,
    Q_b,
    DO_b,
    G_b,
    Lse_b,
    Delta_b,
    DQ_b,
    head0,
    GROUP,
    m_lo,
    m_mid,
    m_full,
    stride_q,
    stride_o,
    stride_g,
    stride_dqa,
    SQ,
    SK,
    HEAD_D,
    qk_scale,
    clip_c,
    clip_gamma,
    HAS_CLIP: tl.constexpr,
    HAS_GATE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The query tiles of one key tile, first the masked [m_lo, m_mid) (``_bwd_kernel``), then [m_full, SQ),
    for each of the GROUP query heads head0.. of its kv head (backward, keys on M): dV += Y^T dO, dK += dS^T Q (unscaled) and, with ATOMIC_DQ, dQ += dS K
    atomically into the fp32 buffer (unscaled). One flat loop over (head, tile) pairs: a loop over
    heads around the loop over tiles kept more registers live (the heads share the tile range).
    *_b: the tensors at this batch entry (Lse_b / Delta_b at its first row); k, v: the key tile
    [BLOCK_N, BLOCK_D]; key_ok: its keys that exist and are not padded (used on masked tiles or with HAS_KPM).
    Rows past SQ load lse = +inf, so their P is exactly 0."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    sq_m = stride_q[1]
    so_m = stride_o[1]
    sg_m = stride_g[1]
    sdq_m = stride_dqa[1]
    q_tile = offs_m0[:, None] * sq_m + offs_d[None, :]
    do_tile = offs_m0[:, None] * so_m + offs_d[None, :]
    dq_tile = offs_m0[:, None] * sdq_m + offs_d[None, :]
    d_ok = offs_d[None, :] < HEAD_D
    for FULL in tl.static_range(2):
        lo = m_full if FULL else m_lo
        hi = SQ if FULL else m_mid
        n_steps = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
        for step in range(0, n_steps * GROUP):
            head = tl.cast(head0 + step // n_steps, tl.int64)
            start_m = lo + (step % n_steps) * BLOCK_M
            offs_m = start_m + offs_m0
            start = tl.cast(start_m, tl.int64)
            Q_head = Q_b + head * stride_q[2]
            DO_head = DO_b + head * stride_o[2]
            G_head = G_b + head * stride_g[2]
            DQ_head = DQ_b + head * stride_dqa[2]
            lse_row = Lse_b + head * SQ
            delta_row = Delta_b + head * SQ
            row_ok = offs_m < SQ  # the last query tile may hold rows past SQ
            rd_ok = row_ok[:, None]
            if PAD_D:
                rd_ok = rd_ok & d_ok
            q = tl.load(Q_head + start * sq_m + q_tile, mask=rd_ok, other=0.0).to(DOT_T)
            do = tl.load(DO_head + start * so_m + do_tile, mask=rd_ok, other=0.0).to(DOT_T)
            lse2 = tl.load(lse_row + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_row + offs_m, mask=row_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
            pt = tl.exp2(st - lse2[None, :])
            if not FULL:
                valid = key_ok[:, None]
                if CAUSAL:
                    valid = valid & (offs_n[:, None] <= offs_m[None, :] + (SK - SQ))
                pt = tl.where(valid, pt, 0.0)
            elif HAS_KPM:
                pt = tl.where(key_ok[:, None], pt, 0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
            if HAS_GATE:
                # dO_u = dOut * gate, applied on the score side: dP^T = (V dOut^T) g, dV += (Y^T g) dOut
                # (dOut goes from memory to the matrix instruction untouched)
                g = tl.load(G_head + start * sg_m + offs_m0 * sg_m, mask=row_ok, other=0.0).to(tl.float32)
                dpt = dpt * g[None, :]
            if HAS_CLIP:
                yt, dpt = clip_grad(pt, dpt, clip_c, clip_gamma)
            else:
                yt = pt
            if HAS_GATE:
                yt = yt * g[None, :]
            dv += tl.dot(yt.to(DOT_T), do, input_precision=PREC)
            dst = (pt * (dpt - delta[None, :])).to(DOT_T)
            dk += tl.dot(dst, q, input_precision=PREC)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(dst), k, input_precision=PREC)
                tl.atomic_add(DQ_head + start * sdq_m + dq_tile, dq, mask=rd_ok, sem="relaxed")
    return dk, dv


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    Out,
    OutU,
    Lse,
    Sink,
    Gate,
    Kpm,
    stride_q,
    stride_k,
    stride_v,
    stride_o,
    stride_g,
    stride_kpmb,
    H,
    GROUP,
    SQ,
    SK,
    HEAD_D,
    qk_scale,
    clip_c,
    clip_gamma,
    HAS_SINK: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_GATE: tl.constexpr,
    SAVE_UNGATED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One query tile of one (batch, head); grid (b * H * cdiv(SQ, BLOCK_M),)."""
    bh, bi, hi, pid_m = _program_tile(SQ, H, CAUSAL, BLOCK_M)  # causal: the longest rows first
    hk = hi // GROUP
    m0 = pid_m * BLOCK_M
    # _tile_rows written out on purpose: with it inlined too, ptxas (triton 3.6) scheduled the fp32 d64 sm_90
    # forward differently (the helpers' line-info labels); tools/triton_compile_report.py --compare shows it.
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < SQ
    rd_ok = row_ok[:, None]
    if PAD_D:
        rd_ok = rd_ok & (offs_d[None, :] < HEAD_D)
    q = _load_tile(Q, stride_q, bi, hi, offs_m[:, None], offs_d, rd_ok).to(DOT_T)
    k_head = K + bi * stride_k[0] + hk.to(tl.int64) * stride_k[2]
    v_head = V + bi * stride_v[0] + hk.to(tl.int64) * stride_v[2]
    sk_n = stride_k[1]
    sv_n = stride_v[1]
    kpm_row = Kpm + bi * stride_kpmb

    if HAS_SINK:
        a2 = tl.load(Sink + hi).to(tl.float32) * 1.4426950408889634
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + a2
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full, n_end = _key_range(m0, SQ, SK, CAUSAL, BLOCK_M, BLOCK_N)
    lse2 = m_i  # read by pass 2 only
    # pass 1: online softmax (and, without clipping, the output); with clipping, pass 2: the clipped
    # probabilities against the final normaliser
    for CLIP_PASS in tl.static_range(1 + HAS_CLIP):
        acc, m_i, l_i = _fwd_tiles(
            acc,
            m_i,
            l_i,
            q,
            k_head,
            v_head,
            kpm_row,
            n_full,
            n_end,
            offs_m,
            sk_n,
            sv_n,
            SQ,
            SK,
            HEAD_D,
            lse2,
            qk_scale,
            clip_c,
            clip_gamma,
            CLIP_PASS,
            HAS_CLIP,
            CAUSAL,
            HAS_KPM,
            PAD_D,
            DOT_T,
            PREC,
            BLOCK_N,
            BLOCK_D,
        )
        if not CLIP_PASS:
            has_mass = l_i > 0.0
            lse2 = tl.where(has_mass, m_i + tl.log2(tl.where(has_mass, l_i, 1.0)), float("inf"))
    if HAS_CLIP:
        o = acc
    else:
        o = acc / tl.where(has_mass, l_i, 1.0)[:, None]

    tl.store(Lse + bh.to(tl.int64) * SQ + offs_m, lse2, mask=row_ok)
    o_off = (
        bi * stride_o[0] + hi.to(tl.int64) * stride_o[2] + offs_m[:, None].to(tl.int64) * stride_o[1] + offs_d[None, :]
    )
    if HAS_GATE:
        if SAVE_UNGATED:
            tl.store(OutU + o_off, o.to(OutU.dtype.element_ty), mask=rd_ok)
        g = tl.load(_head_rows(Gate, stride_g, bi, hi, offs_m), mask=row_ok, other=0.0)
        o = o * g.to(tl.float32)[:, None]
    tl.store(Out + o_off, o.to(Out.dtype.element_ty), mask=rd_ok)


@triton.jit
def _bwd_preprocess_kernel(
    O,
    DO,
    Gate,
    Delta,
    DGate,
    stride_o,
    stride_do,
    stride_g,
    H,
    SQ,
    HEAD_D,
    HAS_GATE: tl.constexpr,
    O_UNGATED: tl.constexpr,
    STORE_DELTA: tl.constexpr,
    PAD_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Per row t = rowsum(dOut * O). O ungated (gate needs a gradient): d(gate) = t, D = t * gate.
    O is the returned output otherwise (gated or not): D = t. D goes to [b, h, sq], d(gate) to [b, sq, h].
    Grid (b * H * cdiv(SQ, BLOCK_M),)."""
    num_m = tl.cdiv(SQ, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // num_m
    bi = (bh // H).to(tl.int64)
    hi = bh % H
    offs_m, offs_d, row_ok, rd_ok = _tile_rows((pid % num_m) * BLOCK_M, SQ, HEAD_D, PAD_D, BLOCK_M, BLOCK_D)
    rows = offs_m[:, None].to(tl.int64)
    o = _load_tile(O, stride_o, bi, hi, rows, offs_d, rd_ok).to(tl.float32)
    do = _load_tile(DO, stride_do, bi, hi, rows, offs_d, rd_ok).to(tl.float32)
    t = tl.sum(o * do, 1)
    delta = t
    if HAS_GATE:
        if O_UNGATED:
            tl.store(DGate + (bi * SQ + offs_m) * H + hi, t, mask=row_ok)
            g = tl.load(_head_rows(Gate, stride_g, bi, hi, offs_m), mask=row_ok, other=0.0)
            delta = t * g.to(tl.float32)
    if STORE_DELTA:
        tl.store(Delta + bh.to(tl.int64) * SQ + offs_m, delta, mask=row_ok)


@triton.jit
def _bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    Gate,
    Kpm,
    DQ,
    stride_q,
    stride_k,
    stride_v,
    stride_o,
    stride_g,
    stride_kpmb,
    stride_dq,
    H,
    GROUP,
    SQ,
    SK,
    HEAD_D,
    qk_scale,
    sm_scale,
    clip_c,
    clip_gamma,
    CLIP_DELTA: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    HAS_GATE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One query tile over the key tiles (grid as the forward's): dQ = scale * dS K (the deterministic
    second pass). CLIP_DELTA (clipped softmax, a pass before the others): D' = rowsum(P * dP') to Delta
    instead, dP' = c * 1[0 <= c P + gamma <= 1] * (dO_u V^T); DQ is not touched."""
    bh, bi, hi, pid_m = _program_tile(SQ, H, CAUSAL, BLOCK_M)
    hk = hi // GROUP
    m0 = pid_m * BLOCK_M
    offs_m, offs_d, row_ok, rd_ok = _tile_rows(m0, SQ, HEAD_D, PAD_D, BLOCK_M, BLOCK_D)
    rows = offs_m[:, None].to(tl.int64)
    q = _load_tile(Q, stride_q, bi, hi, rows, offs_d, rd_ok).to(DOT_T)
    do = _load_tile(DO, stride_o, bi, hi, rows, offs_d, rd_ok)
    if HAS_GATE:
        g = tl.load(_head_rows(Gate, stride_g, bi, hi, offs_m), mask=row_ok, other=0.0)
        do = do.to(tl.float32) * g.to(tl.float32)[:, None]
    do = do.to(DOT_T)
    lse2 = tl.load(Lse + bh.to(tl.int64) * SQ + offs_m, mask=row_ok, other=float("inf"))
    k_head = K + bi * stride_k[0] + hk.to(tl.int64) * stride_k[2]
    v_head = V + bi * stride_v[0] + hk.to(tl.int64) * stride_v[2]
    sk_n = stride_k[1]
    sv_n = stride_v[1]
    kpm_row = Kpm + bi * stride_kpmb
    if CLIP_DELTA:
        delta = lse2
        acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        delta = tl.load(Delta + bh.to(tl.int64) * SQ + offs_m, mask=row_ok, other=0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full, n_end = _key_range(m0, SQ, SK, CAUSAL, BLOCK_M, BLOCK_N)
    acc = _dq_tiles(
        acc,
        q,
        do,
        lse2,
        delta,
        k_head,
        v_head,
        kpm_row,
        n_full,
        n_end,
        offs_m,
        sk_n,
        sv_n,
        SQ,
        SK,
        HEAD_D,
        qk_scale,
        clip_c,
        clip_gamma,
        CLIP_DELTA,
        HAS_CLIP,
        CAUSAL,
        HAS_KPM,
        PAD_D,
        DOT_T,
        PREC,
        BLOCK_N,
        BLOCK_D,
    )
    if CLIP_DELTA:
        tl.store(Delta + bh.to(tl.int64) * SQ + offs_m, acc, mask=row_ok)
    else:
        dq = acc * sm_scale
        tl.store(_head_rows(DQ, stride_dq, bi, hi, rows) + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=rd_ok)


@triton.jit
def _bwd_kernel(
    Q,
    K,
    V,
    DO,
    Lse,
    Delta,
    Gate,
    Kpm,
    DK,
    DV,
    DQacc,
    stride_q,
    stride_k,
    stride_v,
    stride_o,
    stride_g,
    stride_kpmb,
    stride_dk,
    stride_dqa,
    H,
    H_KV,
    GROUP,
    SQ,
    SK,
    HEAD_D,
    qk_scale,
    sm_scale,
    clip_c,
    clip_gamma,
    HAS_CLIP: tl.constexpr,
    HAS_GATE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_T: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One key tile of one (batch, kv head), over the query tiles of every query head of its group
    (grid (b * H_KV * cdiv(SK, BLOCK_N),)): dK, dV and (ATOMIC_DQ) dQ += dS K into the fp32 DQacc,
    unscaled (the launcher scales it)."""
    num_n = tl.cdiv(SK, BLOCK_N)
    pid = tl.program_id(0)
    bhk = pid // num_n
    bi = (bhk // H_KV).to(tl.int64)
    hk = bhk % H_KV
    n0 = (pid % num_n) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < SK
    kd_ok = key_ok[:, None]
    if PAD_D:
        kd_ok = kd_ok & (offs_d[None, :] < HEAD_D)
    keys = offs_n[:, None].to(tl.int64)
    k = tl.load(
        K + bi * stride_k[0] + hk.to(tl.int64) * stride_k[2] + keys * stride_k[1] + offs_d[None, :],
        mask=kd_ok,
        other=0.0,
    ).to(DOT_T)
    v = tl.load(
        V + bi * stride_v[0] + hk.to(tl.int64) * stride_v[2] + keys * stride_v[1] + offs_d[None, :],
        mask=kd_ok,
        other=0.0,
    ).to(DOT_T)
    if HAS_KPM:
        key_ok = key_ok & (tl.load(Kpm + bi * stride_kpmb + offs_n, mask=key_ok, other=0) != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # query tiles [m_lo, m_full) straddle the causal diagonal (masked), [m_full, SQ) see every key;
    # the last, partial key tile is masked everywhere unless key padding masks it anyway
    m_lo = 0
    m_full = 0
    if CAUSAL:
        m_lo = (tl.maximum(n0 - (SK - SQ), 0) // BLOCK_M) * BLOCK_M
        last_key = tl.minimum(n0 + BLOCK_N, SK) - 1
        m_full = tl.cdiv(tl.maximum(last_key - (SK - SQ), 0), BLOCK_M) * BLOCK_M
    if not HAS_KPM:
        m_full = tl.where(n0 + BLOCK_N > SK, tl.cdiv(SQ, BLOCK_M) * BLOCK_M, m_full)
    m_mid = tl.minimum(m_full, SQ)
    q_b = Q + bi * stride_q[0]
    do_b = DO + bi * stride_o[0]
    g_b = Gate + bi * stride_g[0]
    dq_b = DQacc + bi * stride_dqa[0]
    lse_b = Lse + bi * H * SQ
    delta_b = Delta + bi * H * SQ
    head0 = hk * GROUP
    dk, dv = _dkdv_tiles(
        dk,
        dv,
        k,
        v,
        key_ok,
        offs_n,
        q_b,
        do_b,
        g_b,
        lse_b,
        delta_b,
        dq_b,
        head0,
        GROUP,
        m_lo,
        m_mid,
        m_full,
        stride_q,
        stride_o,
        stride_g,
        stride_dqa,
        SQ,
        SK,
        HEAD_D,
        qk_scale,
        clip_c,
        clip_gamma,
        HAS_CLIP,
        HAS_GATE,
        CAUSAL,
        HAS_KPM,
        ATOMIC_DQ,
        PAD_D,
        DOT_T,
        PREC,
        BLOCK_M,
        BLOCK_D,
    )
    dk = dk * sm_scale
    off = bi * stride_dk[0] + hk.to(tl.int64) * stride_dk[2] + keys * stride_dk[1] + offs_d[None, :]
    tl.store(DK + off, dk.to(DK.dtype.element_ty), mask=kd_ok)
    tl.store(DV + off, dv.to(DV.dtype.element_ty), mask=kd_ok)


# --------------------------------------------------------------------------------------------
# Launch configuration: candidate tiles per (kernel, head dim, dtype, causal, architecture)
# --------------------------------------------------------------------------------------------

KERNELS = ("fwd", "bwd", "dq", "pre")
DQ_MODES = ("atomic", "pass")


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


_PRE = (triton.Config({"BLOCK_M": 64}, num_warps=4, num_stages=1),)

# Candidates per (architecture family, BLOCK_D, fp32 inputs): 80 = Ampere / Ada (sm_80-89, mma.sync),
# 90 = Hopper and later (wgmma: 64-row warpgroup tiles on M). fwd / dq: BLOCK_M query rows on M;
# bwd: BLOCK_N keys on M, BLOCK_M query rows per step. Every entry compiles within shared memory (sm_80-89:
# 99 KiB, sm_86's) and, for fp16 / bf16, without register spills, with every flag on and every flag off
# (tests/ops/test_flash_attention.py::test_kernels_compile_for_sm80 / _sm90); the facts per config
# are in tools/results/flash_compile_report.md. Tiles are chosen from those facts, not from timings
# (no GPU has run them yet): autotuning picks among them on the GPU.
_TABLE = {
    (90, 64, False): dict(
        fwd=(_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3)),
        bwd=(_cfg(32, 128, 8, 3), _cfg(32, 64, 4, 3)),
        dq=(_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3)),
    ),
    (90, 128, False): dict(
        fwd=(_cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3)),
        bwd=(_cfg(16, 128, 8, 3),),
        dq=(_cfg(128, 32, 8, 3), _cfg(128, 64, 8, 3)),
    ),
    (80, 64, False): dict(
        fwd=(_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)),
        bwd=(_cfg(32, 128, 8, 3), _cfg(32, 64, 4, 3)),
        dq=(_cfg(128, 64, 8, 3), _cfg(64, 64, 4, 3)),
    ),
    (80, 128, False): dict(
        fwd=(_cfg(128, 32, 8, 3),), bwd=(_cfg(32, 64, 8, 3), _cfg(16, 128, 8, 3)), dq=(_cfg(64, 32, 4, 3),)
    ),
}
for _arch in (80, 90):  # fp32 inputs (TF32 products): operands twice as wide in shared memory
    for _bd in (64, 128):
        _TABLE[(_arch, _bd, True)] = dict(
            fwd=(_cfg(64, 32, 4, 2),), bwd=(_cfg(32, 32, 4, 2),), dq=(_cfg(32, 32, 4, 2),)
        )
_INTERPRETER = dict(
    fwd=(_cfg(32, 32, 4, 1),),
    bwd=(_cfg(32, 32, 4, 1),),
    dq=(_cfg(32, 32, 4, 1),),
    pre=(triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1),),
)

# How the backward forms dQ. "pass" (the default, and always under torch.use_deterministic_algorithms):
# a second pass over the keys with the query rows on M (_bwd_dq_kernel), 7 matrix products in all;
# "atomic": inside the dK/dV kernel, dQ += dS K into an fp32 buffer with atomics, 5 products
# (FlashAttention-2's count), summation order varying between runs. Why the pass: on Hopper the dQ
# product needs >= 64 query rows per step for wgmma, and with the dK and dV accumulators and a 64-row
# dQ tile live at once every such tile spills registers (d 64 and 128, 4 or 8 warps; the facts for
# OUTEFF_FLASH_DQ=atomic are in the compile report); 32- or 16-row steps fit but put the dQ product
# on mma.sync. The pass keeps every product on wgmma without spills, and is deterministic.
# OUTEFF_FLASH_DQ=atomic selects the other structure (to measure both on a GPU).
DEFAULT_DQ_MODE = "pass"


def _entry(head_dim: int, dtype: torch.dtype, arch: Optional[int]) -> dict:
    if arch is None:
        return _INTERPRETER
    return _TABLE[(90 if arch >= 90 else 80, block_d(head_dim), dtype == torch.float32)]


def dq_mode(deterministic: bool) -> str:
    """How the backward forms dQ (``DQ_MODES``): "pass" under deterministic algorithms, else
    ``OUTEFF_FLASH_DQ`` (atomic | pass) or ``DEFAULT_DQ_MODE``."""
    if deterministic:
        return "pass"
    mode = os.environ.get("OUTEFF_FLASH_DQ") or DEFAULT_DQ_MODE
    if mode not in DQ_MODES:
        raise ValueError(f"OUTEFF_FLASH_DQ={mode!r}: expected one of {DQ_MODES}")
    return mode


def kernel_configs(kind: str, head_dim: int, dtype: torch.dtype, causal: bool, arch: Optional[int]):
    """The candidate launch configurations (``triton.Config``: tiles, warps, stages) of kernel ``kind``
    (``KERNELS``) for a head dim, input dtype, causal flag and GPU architecture (compute capability
    major * 10 + minor; None = the Triton interpreter). Architectures below sm_80 are refused by the
    launcher; sm_80-89 share the Ampere set, sm_90 and later the Hopper set. The first candidate is
    what a launch without autotuning (the interpreter, ahead-of-time compiles with one config,
    ``OUTEFF_FLASH_AUTOTUNE=0``) runs. The causal flag keys the tuning, not the set."""
    if kind == "pre":
        return _INTERPRETER["pre"] if arch is None else _PRE
    return _entry(head_dim, dtype, arch)[kind]


def _dot_types(dtype: torch.dtype, arch: Optional[int]):
    if arch is None:
        # the interpreter mishandles bf16 blocks: upcast every load to fp32
        return tl.float32, "ieee"
    return _TORCH_TO_TL[dtype], ("tf32" if dtype == torch.float32 else "ieee")


def device_arch(device: torch.device) -> Optional[int]:
    """Compute capability as major * 10 + minor for a CUDA device; None under the interpreter."""
    if interpreting(device):
        return None
    major, minor = torch.cuda.get_device_capability(device)
    arch = major * 10 + minor
    if arch < 80:
        raise ValueError(f"CUDA capability sm_{arch}: impl='triton' needs sm_80 or newer (Ampere, Hopper)")
    return arch


# --------------------------------------------------------------------------------------------
# Launches
# --------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor):
    """The (batch, seq, head) strides of a [b, s, h, d] tensor, one kernel argument."""
    return t.stride()[:3]


def _tile_rows_max() -> int:
    """The largest BLOCK_M / BLOCK_N of any candidate."""
    entries = (*_TABLE.values(), _INTERPRETER, dict(pre=_PRE))
    return max(max(c.kwargs.values()) for e in entries for kind in KERNELS if kind in e for c in e[kind])


def tile_addressable(t: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` ([b, s, h, d] or the gate [b, s, h]) when the offsets inside one tile fit int32: the kernels
    add int32 tile offsets (row * seq stride + column, rows < the largest tile) to int64 batch, head
    and tile starts, so tensors and strided views past 2^31 elements are addressed correctly as long
    as seq stride * rows < 2^31. Otherwise a contiguous copy (seq stride h * d); ValueError if even
    that does not fit."""
    rows = _tile_rows_max()
    if t.stride(1) * rows + t.shape[-1] < 2**31:
        return t
    c = t.contiguous()
    if c.stride(1) * rows + c.shape[-1] >= 2**31:
        raise ValueError(
            f"{what} shape {tuple(t.shape)}: one sequence position holds {c.stride(1)} elements; "
            f"impl='triton' addresses tiles of {rows} positions with 32-bit offsets (< 2^31)"
        )
    return c


def _check_grid(programs: int, what: str) -> int:
    if programs > GRID_AXIS0_LIMIT:
        raise ValueError(f"{what}: {programs} programs exceed the grid limit {GRID_AXIS0_LIMIT}; split the batch")
    return programs


def _common(q, k, gate, kpm, causal, arch):
    """What every launch of one call shares: shapes, flags and the gate / key-padding arguments
    (absent: a dummy pointer, never read, and zero strides)."""
    b, sq, h, d = q.shape
    sk, h_kv = k.shape[1], k.shape[2]
    bd = block_d(d)
    dot_t, prec = _dot_types(q.dtype, arch)
    meta = dict(
        HAS_GATE=gate is not None,
        CAUSAL=causal,
        HAS_KPM=kpm is not None,
        PAD_D=bd != d,
        DOT_T=dot_t,
        PREC=prec,
        BLOCK_D=bd,
    )
    gate_args = (gate, gate.stride()) if gate is not None else (q, (0, 0, 0))
    kpm_args = (kpm, kpm.stride(0)) if kpm is not None else (q, 0)
    tune_key = (triton.next_power_of_2(max(sq, sk)),)
    return (b, sq, h, d, sk, h_kv), meta, gate_args, kpm_args, tune_key


def forward_launches(q, k, v, sink, gate, kpm, scale, clip_c, clip_g, has_clip, causal, save_ungated, arch):
    """(launches, out, out_u, lse): the forward's one launch and the tensors it writes.
    out_u (fp32) is the ungated output when ``save_ungated`` (a gate that needs a gradient), else out."""
    (b, sq, h, d, sk, h_kv), meta, (gate_arg, g_strides), (kpm_arg, kpm_stride), tune_key = _common(
        q, k, gate, kpm, causal, arch
    )
    out = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    out_u = torch.empty(out.shape, dtype=torch.float32, device=q.device) if save_ungated else out
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    sink_arg = sink if sink is not None else lse
    configs = kernel_configs("fwd", d, q.dtype, causal, arch)
    launch = KernelLaunch(
        _fwd_kernel,
        "fwd",
        (
            q,
            k,
            v,
            out,
            out_u,
            lse,
            sink_arg,
            gate_arg,
            kpm_arg,
            _strides(q),
            _strides(k),
            _strides(v),
            _strides(out),
            g_strides,
            kpm_stride,
            h,
            h // h_kv,
            sq,
            sk,
            d,
            scale * LOG2E,
            clip_c,
            clip_g,
        ),
        dict(meta, HAS_SINK=sink is not None, HAS_CLIP=has_clip, SAVE_UNGATED=save_ungated),
        lambda c: (_check_grid(b * h * triton.cdiv(sq, c["BLOCK_M"]), "forward"),),
        configs,
        tune_key=tune_key,
    )
    return [launch], out, out_u, lse


def backward_launches(
    q,
    k,
    v,
    dout,
    gate,
    kpm,
    o_saved,
    lse,
    scale,
    clip_c,
    clip_g,
    has_clip,
    causal,
    save_ungated,
    need_dq,
    need_dkdv,
    deterministic,
    arch,
):
    """(launches, delta, dgate, dq_out, dk, dv, atomic_dq), launches in order: the preprocessing (D,
    d(gate)), the clip's D' pass, the dQ pass, the dK/dV kernel (which forms dQ by atomics instead of
    the pass when ``dq_mode`` says "atomic"). dq_out is the fp32 atomic buffer (unscaled; atomic_dq)
    or the finished dQ, None when not needed."""
    (b, sq, h, d, sk, h_kv), meta, (gate_arg, g_strides), (kpm_arg, kpm_stride), tune_key = _common(
        q, k, gate, kpm, causal, arch
    )
    dev = q.device
    delta = torch.empty((b, h, sq), dtype=torch.float32, device=dev)
    dgate = torch.empty((b, sq, h), dtype=torch.float32, device=dev) if save_ungated else None
    # the leading arguments of the dQ and dK/dV kernels, their strides and their scalars
    tensors = (q, k, v, dout, lse, delta, gate_arg, kpm_arg)
    common = (_strides(q), _strides(k), _strides(v), _strides(dout), g_strides, kpm_stride)
    scales = (scale * LOG2E, scale, clip_c, clip_g)
    launches = []

    def row_grid(c):
        return (_check_grid(b * h * triton.cdiv(sq, c["BLOCK_M"]), "backward"),)

    def dq_launch(out, out_strides, clip_delta):
        """The dQ kernel writing dQ to ``out`` or, with ``clip_delta``, the clip's D' to Delta."""
        return KernelLaunch(
            _bwd_dq_kernel,
            "dq",
            (*tensors, out, *common, out_strides, h, h // h_kv, sq, sk, d, *scales),
            dict(meta, CLIP_DELTA=clip_delta, HAS_CLIP=has_clip),
            row_grid,
            kernel_configs("dq", d, q.dtype, causal, arch),
            tune_key=tune_key,
        )

    if save_ungated or not has_clip:
        launches.append(
            KernelLaunch(
                _bwd_preprocess_kernel,
                "pre",
                (
                    o_saved,
                    dout,
                    gate_arg,
                    delta,
                    dgate if save_ungated else delta,
                    _strides(o_saved),
                    _strides(dout),
                    g_strides,
                    h,
                    sq,
                    d,
                ),
                dict(
                    HAS_GATE=meta["HAS_GATE"],
                    O_UNGATED=save_ungated,
                    STORE_DELTA=not has_clip,
                    PAD_D=meta["PAD_D"],
                    BLOCK_D=meta["BLOCK_D"],
                ),
                row_grid,
                kernel_configs("pre", d, q.dtype, causal, arch),
                tune_key=tune_key,
            )
        )
    if has_clip:  # D' = rowsum(P * dP'): the dQ kernel's loop, writing Delta
        launches.append(dq_launch(delta, (0, 0, 0), True))
    atomic_dq = need_dq and dq_mode(deterministic) == "atomic"
    dq_out = None
    if need_dq and not atomic_dq:
        dq_out = torch.empty((b, sq, h, d), dtype=q.dtype, device=dev)
        launches.append(dq_launch(dq_out, _strides(dq_out), False))
    dk = dv = None
    if need_dkdv or atomic_dq:
        if atomic_dq:
            dq_out = torch.zeros((b, sq, h, d), dtype=torch.float32, device=dev)
        dk = torch.empty((b, sk, h_kv, d), dtype=k.dtype, device=dev)
        dv = torch.empty((b, sk, h_kv, d), dtype=v.dtype, device=dev)
        dqa = dq_out if atomic_dq else dk
        launches.append(
            KernelLaunch(
                _bwd_kernel,
                "bwd",
                (*tensors, dk, dv, dqa, *common, _strides(dk), _strides(dqa), h, h_kv, h // h_kv, sq, sk, d, *scales),
                dict(meta, HAS_CLIP=has_clip, ATOMIC_DQ=atomic_dq),
                lambda c: (_check_grid(b * h_kv * triton.cdiv(sk, c["BLOCK_N"]), "backward"),),
                kernel_configs("bwd", d, q.dtype, causal, arch),
                reset_to_zero=("DQacc",) if atomic_dq else (),
                tune_key=tune_key,
            )
        )
    return launches, delta, dgate, dq_out, dk, dv, atomic_dq


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _FlashOutEffAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sink, gate, kpm, scale, clip_gamma, clip_zeta, has_clip, causal):
        arch = device_arch(q.device)
        clip_c = float(clip_zeta - clip_gamma) if has_clip else 1.0
        clip_g = float(clip_gamma) if has_clip else 0.0
        save_ungated = gate is not None and ctx.needs_input_grad[4]
        sink_arg = sink.detach().contiguous() if sink is not None else None
        launches, out, out_u, lse = forward_launches(
            q, k, v, sink_arg, gate, kpm, scale, clip_c, clip_g, has_clip, causal, save_ungated, arch
        )
        for launch in launches:
            run_launch(launch)
        # the ungated output is kept in fp32 for d(gate) = rowsum(dOut * O)
        ctx.save_for_backward(q, k, v, sink, gate, kpm, out_u if save_ungated else out, lse)
        ctx.cfg = (scale, clip_c, clip_g, has_clip, causal, save_ungated, arch)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, sink, gate, kpm, o_saved, lse = ctx.saved_tensors
        scale, *_, arch = ctx.cfg
        dout = tile_addressable(_last_dim_contiguous(dout), "the output gradient")
        need_dq = ctx.needs_input_grad[0]
        need_dkdv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        deterministic = torch.are_deterministic_algorithms_enabled()
        # ctx.cfg: (scale, clip_c, clip_g, has_clip, causal, save_ungated, arch), as backward_launches takes them
        launches, delta, dgate, dq, dk, dv, atomic_dq = backward_launches(
            q, k, v, dout, gate, kpm, o_saved, lse, *ctx.cfg[:-1], need_dq, need_dkdv, deterministic, arch
        )
        for launch in launches:
            run_launch(launch)
        if atomic_dq:
            dq = (dq * scale).to(q.dtype)  # the atomic buffer: fp32, unscaled

        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            # d a_h = - sum_{b, rows} exp(a_h - L) * D  (lse is stored in base 2)
            p_sink = torch.exp2(sink.detach().float().view(1, -1, 1) * LOG2E - lse)
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

    Arguments are validated by ``outeff_attention``; this adds the kernel's own limits
    (``unsupported_reason``: head dim 1..128, fp16 / bf16 / fp32; CUDA sm_80 or newer). Returns
    [b, sq, h, d] in q's dtype. Differentiable w.r.t. q, k, v, sink and gate.
    """
    d = q.shape[-1]
    reason = unsupported_reason(q.dtype, d)
    if reason is not None:
        raise ValueError(f"{reason}; use impl='torch'")
    b, sq, h, _ = q.shape
    if b == 0 or sq == 0 or h == 0:
        return torch.zeros((b, sq, h, d), dtype=q.dtype, device=q.device) + 0 * q.sum()
    q, k, v = (tile_addressable(_last_dim_contiguous(t), n) for t, n in ((q, "q"), (k, "k"), (v, "v")))
    if gate is not None:
        gate = tile_addressable(gate, "gate")
    if sink is not None:
        sink = sink.float()
    kpm = None
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(torch.int8).contiguous()
    has_clip = clip is not None
    return _FlashOutEffAttention.apply(
        q,
        k,
        v,
        sink,
        gate,
        kpm,
        float(scale),
        float(clip.gamma) if has_clip else 0.0,
        float(clip.zeta) if has_clip else 1.0,
        has_clip,
        bool(causal),
    )
