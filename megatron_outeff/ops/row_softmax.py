"""Fused Triton row softmax for a materialised score matrix: scale + mask + softmax variant + clip.

    p = fused_outeff_softmax(scores, scale=..., sink=..., mask=..., clip=...)

Same semantics as ``reference.outeff_softmax_reference`` (the oracle), forward and backward:

    x_j  = scale * scores_j,  -inf where mask_j is True (masked OUT)
    m    = max(max_j x_j, a_h)                       (a_h = sink[h]; absent for vanilla)
    p_j  = exp(x_j - m) / (exp(a_h - m) + sum_k exp(x_k - m))
    y_j  = clamp((zeta - gamma) * p_j + gamma, 0, 1)   (only with a clip)

A fully masked row gives all-zero probabilities and zero gradients (never NaN). Math is fp32 whatever
the input dtype (fp32 / fp16 / bf16; fp64 is accepted but computed in fp32); the result has the
dtype of ``scores``.

Kernel layout. Scores are viewed as R = b*h*sq rows of length sk. A program owns a tile of
BLOCK_R rows x BLOCK_C columns. When sk fits one column block (BLOCK_C = next_pow2(sk) <= the
column limit, 8192 by default) a row is read once and written once. Longer rows loop over column
blocks: pass 1 keeps an online (running max, running sum) state that starts at (a_h, 1) with a
sink and (-inf, 0) without, pass 2 re-reads the row and writes the probabilities. The backward
uses the same structure (pass 1: D = rowsum(p * g); pass 2: dx = scale * p * (g - D)). The online
softmax step and the clip with its derivative are the @triton.jit blocks of _triton_common.py,
shared with the flash kernel.

The mask is never expanded in memory: it is read through its broadcast strides (stride 0 on the
broadcast dimensions). Each row also stores its shift m and denominator l (sink included), two
fp32 values per row (2/sk of the score matrix). Not the usual log-normaliser L = m + log(l): with
logits of magnitude 1e4, fp32 L carries an absolute error ~1e-3, which would become a relative
error ~1e-3 of every recomputed p; exp(x - m) / l recomputes p bit-identically to the forward.

What the backward saves (see ``_FusedOutEffSoftmax.forward``):
  * no clip: the output P itself plus (m, l). P is what the caller keeps anyway for P @ V, so the
    saved P costs no memory, and dx = scale * P * (dP - D) needs nothing else; (m, l) give the sink
    probability exp(a_h - m) / l for the offset gradient.
  * clip: the output y cannot give back p where the clamp saturated (y = 0 or 1 hides p), yet those
    p_j still enter dx_j = scale * p_j * (0 - D). So we save the input scores plus (m, l) and
    recompute p = exp(scale * x - m) / l in fp32. That is one score-sized tensor, the same cost as saving the
    unclipped P, but it is exact in fp32 even for fp16/bf16 inputs and needs no second output
    written in the forward.
The gradient of the sink is -sum over (b, sq) of P_sink * D; each row writes its own term into an
fp32 [R] buffer and a torch sum over (b, sq) finishes it (no atomics, deterministic).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._triton_common import KernelLaunch, clip_grad, clip_probs, online_softmax_step, run_launch
from .triton_env import interpreting
from .variants import Clip, check_float_rank4

# Longest row handled in a single column block; longer rows use the two-pass loop.
MAX_BLOCK_COLS = 8192
# Elements per program tile (rows are packed into a tile when sk is short).
_TILE_ELEMS_GPU = 4096
_TILE_ELEMS_INTERPRETER = 16384  # the interpreter pays per program and per op, not per element


@triton.jit
def _load_logits(X, MASK, x_row, m_row, c0, cols, SK, row_ok, msk, scale, HAS_MASK: tl.constexpr):
    """fp32 tile scale * x of the columns c0 + cols, with -inf where masked out or outside the row / matrix."""
    x_row = x_row + c0
    m_row = m_row + c0 * msk
    SK = SK - c0
    ok = row_ok[:, None] & (cols[None, :] < SK)
    x = tl.load(X + x_row[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x = x * scale
    if HAS_MASK:
        mk = tl.load(MASK + m_row[:, None] + cols[None, :].to(tl.int64) * msk, mask=ok, other=1)
        ok = ok & (mk == 0)
    return tl.where(ok, x, float("-inf"))


@triton.jit
def _store_tile(Y, x_row, c0, cols, SK, row_ok, y):
    """Writes the fp32 tile y [BLOCK_R, BLOCK_C] to the columns c0 + cols in Y's dtype, inside the row / matrix
    only."""
    x_row = x_row + c0
    SK = SK - c0
    ok = row_ok[:, None] & (cols[None, :] < SK)
    tl.store(Y + x_row[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _row_offsets(pid, dims, mask_strides, BLOCK_R: tl.constexpr):
    """The BLOCK_R rows of program pid: (rows, row_ok, their first element, their head, their first mask
    element); dims and mask_strides as the kernels take them."""
    R, SK, H, SQ = dims
    msb, msh, msq, _ = mask_strides
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows = tl.where(row_ok, rows, 0)
    bi = rows // (H * SQ)
    hi = (rows // SQ) % H
    qi = rows % SQ
    m_row = bi * msb + hi * msh + qi * msq
    return rows, row_ok, rows * SK, hi, m_row


@triton.jit
def _fwd_kernel(
    X,
    Y,
    ROW_M,
    ROW_L,
    SINK,
    MASK,
    dims,
    mask_strides,
    scale,
    clip,
    HAS_SINK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One tile of BLOCK_R rows of the scores X (grid (cdiv(R, BLOCK_R),)): Y = the probabilities (clipped
    when HAS_CLIP), ROW_M / ROW_L = each row's shift m and denominator l. dims = (R = b * h * sq rows, SK
    columns, H heads, SQ queries); mask_strides: MASK's (b, h, sq, sk) strides, 0 where it broadcasts;
    clip = (gamma, zeta). SINGLE: a row fits one column block of BLOCK_C."""
    pid = tl.program_id(0)
    rows, row_ok, x_row, hi, m_row = _row_offsets(pid, dims, mask_strides, BLOCK_R)
    SK = dims[1]
    msk = mask_strides[3]
    gamma, zeta = clip
    cols = tl.arange(0, BLOCK_C)
    # online softmax state (running max, running sum): (a_h, 1) with a sink, (-inf, 0) without
    if HAS_SINK:
        m_i = tl.load(SINK + hi).to(tl.float32)
        l_i = tl.full([BLOCK_R], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)

    if SINGLE:  # the whole row in one tile: one step, its exponentials kept
        x = _load_logits(X, MASK, x_row, m_row, 0, cols, SK, row_ok, msk, scale, HAS_MASK)
        m_i, l_i, _, e = online_softmax_step(m_i, l_i, x, False)
    else:  # pass 1 over the column blocks
        for c0 in range(0, SK, BLOCK_C):
            x = _load_logits(X, MASK, x_row, m_row, c0, cols, SK, row_ok, msk, scale, HAS_MASK)
            m_i, l_i, _, _ = online_softmax_step(m_i, l_i, x, False)
    m_s = tl.where(m_i == float("-inf"), 0.0, m_i)  # fully masked, no sink: shift by 0
    l_i = tl.where(l_i > 0, l_i, 1.0)
    if SINGLE:
        p = e / l_i[:, None]
        if HAS_CLIP:
            p = clip_probs(p, zeta - gamma, gamma)
        _store_tile(Y, x_row, 0, cols, SK, row_ok, p)
    else:  # pass 2: write the probabilities
        for c0 in range(0, SK, BLOCK_C):
            x = _load_logits(X, MASK, x_row, m_row, c0, cols, SK, row_ok, msk, scale, HAS_MASK)
            p = tl.exp(x - m_s[:, None]) / l_i[:, None]
            if HAS_CLIP:
                p = clip_probs(p, zeta - gamma, gamma)
            _store_tile(Y, x_row, c0, cols, SK, row_ok, p)
    tl.store(ROW_M + rows, m_s, mask=row_ok)
    tl.store(ROW_L + rows, l_i, mask=row_ok)


@triton.jit
def _bwd_block(
    DY,
    S,
    MASK,
    x_row,
    m_row,
    c0,
    cols,
    SK,
    row_ok,
    msk,
    rm,
    rl,
    scale,
    clip,
    HAS_MASK: tl.constexpr,
    HAS_CLIP: tl.constexpr,
):
    """(p, g) for the tile of columns c0 + cols: p the unclipped probabilities, g = dLoss/dp (through the clip)."""
    x_row = x_row + c0
    m_row = m_row + c0 * msk
    SK = SK - c0
    ok = row_ok[:, None] & (cols[None, :] < SK)
    dy = tl.load(DY + x_row[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_CLIP:
        # S holds the input scores: recompute p = exp(scale * x - m) / l in fp32, as the forward did
        x = _load_logits(S, MASK, x_row, m_row, 0, cols, SK, row_ok, msk, scale, HAS_MASK)
        p = tl.exp(x - rm[:, None]) / rl[:, None]
        gamma, zeta = clip
        _, g = clip_grad(p, dy, zeta - gamma, gamma)
    else:
        # S holds the saved output P
        p = tl.load(S + x_row[:, None] + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        g = dy
    return p, g


@triton.jit
def _bwd_kernel(
    DY,
    S,
    ROW_M,
    ROW_L,
    SINK,
    MASK,
    DX,
    DSINK_ROW,
    dims,
    mask_strides,
    scale,
    clip,
    HAS_SINK: tl.constexpr,
    NEED_DSINK: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One tile of BLOCK_R rows (grid and arguments as ``_fwd_kernel``'s): DX = dLoss/dx from DY and S (the
    saved output P, or the input scores when HAS_CLIP); NEED_DSINK: DSINK_ROW = each row's term of
    d(sink), -P_sink * D."""
    pid = tl.program_id(0)
    rows, row_ok, x_row, hi, m_row = _row_offsets(pid, dims, mask_strides, BLOCK_R)
    SK = dims[1]
    msk = mask_strides[3]
    cols = tl.arange(0, BLOCK_C)
    rm = tl.load(ROW_M + rows, mask=row_ok, other=0.0)
    rl = tl.load(ROW_L + rows, mask=row_ok, other=1.0)
    if SINGLE:
        p, g = _bwd_block(DY, S, MASK, x_row, m_row, 0, cols, SK, row_ok, msk, rm, rl, scale, clip, HAS_MASK, HAS_CLIP)
        d = tl.sum(p * g, axis=1)
        _store_tile(DX, x_row, 0, cols, SK, row_ok, scale * p * (g - d[:, None]))
    else:
        d = tl.zeros([BLOCK_R], tl.float32)
        # pass 1: d = rowsum(p * g) over every column block; pass 2: dx, with the complete d
        for PASS in tl.static_range(2):
            for c0 in range(0, SK, BLOCK_C):
                p, g = _bwd_block(
                    DY, S, MASK, x_row, m_row, c0, cols, SK, row_ok, msk, rm, rl, scale, clip, HAS_MASK, HAS_CLIP
                )
                if PASS == 0:
                    d += tl.sum(p * g, axis=1)
                else:
                    _store_tile(DX, x_row, c0, cols, SK, row_ok, scale * p * (g - d[:, None]))
    if NEED_DSINK:
        a = tl.load(SINK + hi).to(tl.float32)
        tl.store(DSINK_ROW + rows, -(tl.exp(a - rm) / rl) * d, mask=row_ok)


def _launch_config(R: int, sk: int, max_block_cols: int, interpreted: bool):
    block_c = min(triton.next_power_of_2(max(sk, 1)), triton.next_power_of_2(max_block_cols))
    single = sk <= block_c
    tile = _TILE_ELEMS_INTERPRETER if interpreted else _TILE_ELEMS_GPU
    block_r = max(1, min(triton.next_power_of_2(R), tile // block_c))
    elems = block_r * block_c
    num_warps = 4 if elems <= 2048 else (8 if elems <= 8192 else 16)
    return block_r, block_c, single, num_warps


def _mask_args(mask: Optional[torch.Tensor], shape, dummy: torch.Tensor):
    if mask is None:
        return dummy, (0, 0, 0, 0)
    m = mask.expand(shape)  # a view: broadcast dims get stride 0, nothing is copied
    return m.view(torch.uint8), m.stride()


def _launch(kernel, kind, args, R, sk, max_block_cols, interpreted, **flags) -> KernelLaunch:
    """One launch of either kernel as ``_launch_config`` sizes it (deterministic: one config)."""
    block_r, block_c, single, num_warps = _launch_config(R, sk, max_block_cols, interpreted)
    grid = (triton.cdiv(R, block_r),)
    return KernelLaunch(
        kernel,
        kind,
        args,
        dict(flags, SINGLE=single, BLOCK_R=block_r, BLOCK_C=block_c),
        lambda _: grid,
        (triton.Config({}, num_warps=num_warps),),
    )


def _shared_args(like, row_m, sink_f, mask, scale, clip):
    """What both kernels take besides their own tensors: (sink, mask) (row_m stands in for an absent sink,
    ``like`` for an absent mask), the trailing arguments (dims = (R = b * h * sq, SK, H, SQ), the mask's
    strides, 0 where it broadcasts, scale, clip = (gamma, zeta)) and the constexpr flags of the optional inputs."""
    b, h, sq, sk = like.shape
    mask_t, mask_strides = _mask_args(mask, like.shape, like)
    gamma, zeta = (clip.gamma, clip.zeta) if clip is not None else (0.0, 1.0)
    sink_mask = (sink_f if sink_f is not None else row_m, mask_t)
    tail = ((b * h * sq, sk, h, sq), mask_strides, float(scale), (float(gamma), float(zeta)))
    return sink_mask, tail, dict(HAS_SINK=sink_f is not None, HAS_MASK=mask is not None, HAS_CLIP=clip is not None)


def forward_launch(x, sink_f, mask, scale, clip, max_block_cols, interpreted):
    """(launch, y, row_m, row_l): the forward kernel's launch on the contiguous scores x and its outputs."""
    b, h, sq, sk = x.shape
    R = b * h * sq
    y = torch.empty_like(x)
    row_m = torch.empty(R, dtype=torch.float32, device=x.device)
    row_l = torch.empty(R, dtype=torch.float32, device=x.device)
    sink_mask, tail, flags = _shared_args(x, row_m, sink_f, mask, scale, clip)
    args = (x, y, row_m, row_l, *sink_mask, *tail)
    return _launch(_fwd_kernel, "fwd", args, R, sk, max_block_cols, interpreted, **flags), y, row_m, row_l


def backward_launch(dy, saved, row_m, row_l, sink_f, mask, scale, clip, max_block_cols, need_dsink, interpreted):
    """(launch, dx, dsink_row): the backward kernel's launch and its outputs (``saved``: see forward)."""
    b, h, sq, sk = saved.shape
    R = b * h * sq
    dx = torch.empty_like(saved)
    dsink_row = torch.empty(R, dtype=torch.float32, device=saved.device) if need_dsink else row_m
    sink_mask, tail, flags = _shared_args(saved, row_m, sink_f, mask, scale, clip)
    args = (dy, saved, row_m, row_l, *sink_mask, dx, dsink_row, *tail)
    launch = _launch(_bwd_kernel, "bwd", args, R, sk, max_block_cols, interpreted, NEED_DSINK=need_dsink, **flags)
    return launch, dx, dsink_row


class _FusedOutEffSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, sink, mask, scale, clip, max_block_cols):
        x = scores.contiguous()
        sink_f = sink.detach().float().contiguous() if sink is not None else None
        launch, y, row_m, row_l = forward_launch(x, sink_f, mask, scale, clip, max_block_cols, interpreting(x.device))
        run_launch(launch)
        ctx.scale, ctx.clip, ctx.max_block_cols = scale, clip, max_block_cols
        ctx.sink_dtype = sink.dtype if sink is not None else None
        saved = x if clip is not None else y  # see the module docstring
        ctx.save_for_backward(saved, row_m, row_l, sink_f, mask)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        saved, row_m, row_l, sink_f, mask = ctx.saved_tensors
        b, h, sq, _ = saved.shape
        dy = dy.contiguous()
        need_dx = ctx.needs_input_grad[0]
        need_dsink = sink_f is not None and ctx.needs_input_grad[1]
        if not (need_dx or need_dsink):
            return None, None, None, None, None, None
        launch, dx, dsink_row = backward_launch(
            dy,
            saved,
            row_m,
            row_l,
            sink_f,
            mask,
            ctx.scale,
            ctx.clip,
            ctx.max_block_cols,
            need_dsink,
            interpreting(saved.device),
        )
        run_launch(launch)
        dsink = dsink_row.view(b, h, sq).sum(dim=(0, 2)).to(ctx.sink_dtype) if need_dsink else None
        return (dx if need_dx else None), dsink, None, None, None, None


def _validate(scores, scale, sink, mask, clip, max_block_cols):
    check_float_rank4("scores", scores, "[batch, heads, sq, sk]")
    h = scores.shape[1]
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale={scale!r}: expected a finite float") from None
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale}: expected a finite float")
    if sink is not None:
        if not isinstance(sink, torch.Tensor) or sink.shape != (h,):
            shape = tuple(sink.shape) if isinstance(sink, torch.Tensor) else type(sink).__name__
            raise ValueError(f"sink shape {shape}: expected ({h},), one sink logit per head of scores")
        if not sink.is_floating_point():
            raise ValueError(f"sink dtype {sink.dtype}: expected a floating dtype (float32)")
        if sink.device != scores.device:
            raise ValueError(f"sink on {sink.device}: expected the device of scores ({scores.device})")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            what = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask dtype {what}: expected torch.bool, True = masked out")
        try:
            ok = torch.broadcast_shapes(mask.shape, scores.shape) == scores.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"mask shape {tuple(mask.shape)}: expected a shape broadcastable to scores {tuple(scores.shape)}"
            )
        if mask.device != scores.device:
            raise ValueError(f"mask on {mask.device}: expected the device of scores ({scores.device})")
    clip = Clip.parse(clip)
    if int(max_block_cols) < 1:
        raise ValueError(f"max_block_cols={max_block_cols}: expected a positive int")
    return scale, clip


def fused_outeff_softmax(
    scores: torch.Tensor,
    *,
    scale: float = 1.0,
    sink: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    clip=None,
    max_block_cols: int = MAX_BLOCK_COLS,
) -> torch.Tensor:
    """Fused scale + mask + softmax variant + clip over the last dim of ``scores`` [b, h, sq, sk].

    sink: None (vanilla) or [h] sink logits a_h (differentiable: a learnable offset). mask: None or
    bool broadcastable to scores, True = masked out. clip: None, ``Clip`` or (gamma, zeta).
    Returns probabilities in scores' dtype, differentiable w.r.t. scores and sink.
    max_block_cols: longest row handled in one column block (rows beyond use the two-pass loop).
    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.
    """
    scale, clip = _validate(scores, scale, sink, mask, clip, max_block_cols)
    if scores.numel() == 0:
        return torch.zeros_like(scores) + 0 * scores  # keeps the graph; nothing to compute
    return _FusedOutEffSoftmax.apply(scores, sink, mask, scale, clip, int(max_block_cols))
