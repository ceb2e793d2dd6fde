"""Sink attention on torch's own fused attention kernels, on every device torch has them for
(``sdpa_outeff_attention``: ``outeff_attention(impl="sdpa")``, what ``impl="auto"`` runs for every
unclipped variant on CUDA and on CPU).

torch's fused kernels (the ones ``F.scaled_dot_product_attention`` runs) compute vanilla attention in
blocks, never materialising the [sq, sk] matrix, and return the output O_v with the row
log-normaliser L_v = log sum_j exp(s q.k_j + bias_j) (natural log, fp32). A sink logit a_h changes
only the normaliser (field notes section 1):

    L   = logaddexp(L_v, a_h)                   true log-normaliser, sink included
    out = O_v * exp(L_v - L) = O_v * sigmoid(L_v - a_h)
    P_sink = exp(a_h - L) = sigmoid(a_h - L_v)

Backward (FlashAttention-2, unchanged by the sink once L includes it): each kernel's backward
recomputes P = exp(s q.k + bias - L) from the L it is given and forms D = rowsum(dO * out) from the
out it is given, so passing the sink-including (out, L) yields the exact gradients of q, k, v. The
learnable offset's gradient is d a_h = - sum over batch and rows of P_sink * D (the ops' own
derivative ignores any gradient of L, so autograd through ``out * sigmoid(lse - a)`` would miss
terms: hence the ``torch.autograd.Function``). Dropout acts on the normalised P and the rescale is
one factor per row, so it commutes with the kernel's dropout: the forward's RNG state (philox seed
and offset) goes to the backward, which redraws the same mask. Memory stays linear in sq: the extra
tensors are [b, h, sq] row statistics.

The kernels (``KERNELS``; the op schemas are those of torch 2.11 and 2.13, identical):

| name        | device | forward / backward ops (aten::)                                       | LSE shape                   | bias | dropout | GQA |
|-------------|--------|------------------------------------------------------------------------|-----------------------------|------|---------|-----|
| `cpu_flash` | CPU    | `_scaled_dot_product_flash_attention_for_cpu` (+ `_backward`)          | [b, h, sq]                  | yes  | no      | native |
| `flash`     | CUDA   | `_scaled_dot_product_flash_attention` (+ `_backward`)                  | [b, h, sq]                  | no   | philox  | native |
| `efficient` | CUDA   | `_scaled_dot_product_efficient_attention` (+ `_backward`)              | [b, h, ceil(sq / 32) * 32]  | yes (strides aligned to 16, expanded to [b, h, sq, sk]) | philox | expanded K/V |
| `cudnn`     | CUDA   | `_scaled_dot_product_cudnn_attention` (+ `_backward`)                  | [b, h, sq, 1]               | yes (finite -65504, as SDPA) | philox | as torch decides |

Which CUDA kernel runs is SDPA's own choice, ``torch._fused_sdp_choice`` on the very arguments the
kernel gets, so ``torch.nn.attention.sdpa_kernel([...])`` pins it as it pins SDPA. When torch finds no
fused kernel for the arguments as they are, the arguments are relaxed the way a fused kernel can
still serve them (a causal mask folded into the additive bias; GQA's K/V heads expanded); when none
serves them at all, ``SDPAUnavailable`` is raised and ``impl="auto"`` falls back (``dispatch.py``).
``sdpa_backend_record()`` says which kernel ran last and how often each ran.

The log-sum-exp trap: a kernel whose LSE were in base 2 (as once reported for FlexAttention's flash
backend) or of unscaled scores would make the rescale silently wrong. The first call of each kernel
per (device, dtype) checks the convention on a tiny input whose LSE is known in closed form
(``lse_base``): natural log is used as is, base 2 is converted (L ln 2 forward, L' / ln 2 to the
backward), anything else raises.

Masks: ``causal`` with sq == sk uses the kernel's causal mode (it skips masked blocks); causal with
sq != sk (bottom-right aligned, ``reference.causal_mask``; torch's kernels align top-left) and key
padding become an additive -inf bias [1|b, 1, sq|1, sk]; a dense ``mask`` is combined with them into
one bias of its shape. Rows with no visible key (all keys padded, or causal with sq > sk) are set to
exactly zero output with a finite L, so the recomputed P is 0 there and every gradient is exactly 0,
for every variant. Head dims that are not a multiple of 8 are zero-padded on CUDA (as SDPA does;
the scale is explicit, so the scores do not change).

Not served (``SDPAUnavailable``): clipping (the clip needs the normalised P before P @ V, which a
fused pass never has: ``cpu_attention.clipped_outeff_attention`` on CPU, the Triton kernels on CUDA),
dropout on CPU (the CPU kernel has no RNG state to hand to its backward), float64 on CUDA, and
arguments no fused kernel of the installed torch takes.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections import Counter
from typing import Dict, Optional, Tuple

import torch

from .reference import causal_mask

_aten = torch.ops.aten  # the one handle on the fused ops (tests swap in emulators of them)

# torch.nn.attention.SDPBackend values that torch._fused_sdp_choice returns -> our kernel names
_CHOICE_NAMES = {1: "flash", 2: "efficient", 3: "cudnn"}
SDPA_KERNELS = ("cpu_flash", "flash", "efficient", "cudnn")
_CUDNN_MASK_VALUE = -65504.0  # SDPA's own additive mask value for cuDNN (its -inf issue)
_BIAS_ALIGN = 16  # the memory-efficient kernel wants bias strides divisible by 8 (16 in torch <= 2.3)


class SDPAUnavailable(ValueError):
    """No fused kernel of the installed torch serves these arguments (the message says why)."""


# ------------------------------------------------------------------------------------------------
# the kernels: one adapter per fused op pair, the exact calls of the op schemas
# ------------------------------------------------------------------------------------------------
class _Kernel:
    """forward(q, k, v, bias, dropout_p, is_causal, scale) -> (out, lse, rng_state) and
    backward(dout, q, k, v, out, lse, bias, dropout_p, is_causal, scale, rng_state) -> (dq, dk, dv);
    q [b, h, sq, d], k/v [b, h_kv, sk, d]."""

    name = ""
    takes_bias = True
    dropout = True

    def prepare_bias(self, bias: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return bias


class _CpuFlash(_Kernel):
    name, dropout = "cpu_flash", False

    def forward(self, q, k, v, bias, dropout_p, is_causal, scale):
        out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p, is_causal, attn_mask=bias, scale=scale
        )
        return out, lse, ()

    def backward(self, dout, q, k, v, out, lse, bias, dropout_p, is_causal, scale, rng):
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, dropout_p, is_causal, attn_mask=bias, scale=scale
        )


class _Flash(_Kernel):
    name, takes_bias = "flash", False

    def forward(self, q, k, v, bias, dropout_p, is_causal, scale):
        # -> (output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, rng_state, unused, debug_attn_mask)
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = _aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, is_causal, False, scale=scale
        )
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, bias, dropout_p, is_causal, scale, rng):
        cum_q, cum_k, max_q, max_k, seed, offset = rng
        return _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed, offset, scale=scale
        )


class _Efficient(_Kernel):
    name = "efficient"

    def prepare_bias(self, bias, q, k):
        # as SDPA's preprocess_mask: strides aligned (padded storage, sliced back), expanded to 4-D
        sk = bias.shape[-1]
        if any(s % _BIAS_ALIGN for s in bias.stride()[:-1]) or bias.stride(-1) != 1:
            padded = bias.new_zeros(*bias.shape[:-1], -(-sk // _BIAS_ALIGN) * _BIAS_ALIGN)
            bias = padded[..., :sk].copy_(bias)
        return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])

    def forward(self, q, k, v, bias, dropout_p, is_causal, scale):
        # -> (output, log_sumexp [b, h, ceil(sq / 32) * 32], philox_seed, philox_offset)
        out, lse, seed, offset = _aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, dropout_p, is_causal, scale=scale
        )
        return out, lse, (seed, offset)

    def backward(self, dout, q, k, v, out, lse, bias, dropout_p, is_causal, scale, rng):
        seed, offset = rng
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, bias, out, lse, seed, offset, dropout_p, [True, True, True, False], is_causal, scale=scale
        )
        return dq, dk, dv


class _Cudnn(_Kernel):
    name = "cudnn"

    def prepare_bias(self, bias, q, k):
        return bias.clamp_min(_CUDNN_MASK_VALUE)  # as SDPA: no -inf for cuDNN

    def forward(self, q, k, v, bias, dropout_p, is_causal, scale):
        # -> (output, logsumexp [b, h, sq, 1], cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug)
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = _aten._scaled_dot_product_cudnn_attention(
            q, k, v, bias, True, dropout_p, is_causal, False, scale=scale
        )
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)

    def backward(self, dout, q, k, v, out, lse, bias, dropout_p, is_causal, scale, rng):
        cum_q, cum_k, max_q, max_k, seed, offset = rng
        return _aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse, seed, offset, bias, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, scale=scale
        )


KERNELS: Dict[str, _Kernel] = {k.name: k for k in (_CpuFlash(), _Flash(), _Efficient(), _Cudnn())}


# ------------------------------------------------------------------------------------------------
# the log-sum-exp: its rows, its layout per kernel, its base
# ------------------------------------------------------------------------------------------------
def lse_rows(lse: torch.Tensor, sq: int) -> torch.Tensor:
    """The kernel's LSE as [b, h, sq] (a view): cuDNN's trailing dim dropped, the memory-efficient
    kernel's query padding (to a multiple of 32) cut."""
    if lse.dim() == 4:
        lse = lse.squeeze(-1)
    return lse[..., :sq]


def lse_for_kernel(kernel_lse: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """rows [b, h, sq] in the layout the kernel returned its LSE in (trailing dim, padding)."""
    if kernel_lse.dim() == 4:
        return rows.unsqueeze(-1)
    if kernel_lse.shape[-1] == rows.shape[-1]:
        return rows
    full = kernel_lse.clone()
    full[..., : rows.shape[-1]] = rows
    return full


_LSE_BASE: Dict[Tuple[str, str, torch.dtype], float] = {}
_LSE_LOCK = threading.Lock()


def lse_base(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> float:
    """ln(base) of the kernel's log-sum-exp: 1.0 for the natural log, ln 2 for base 2 (cached per
    kernel, device, dtype). Measured on q = k = v = c (one head, sq = sk = 16, the call's head dim),
    whose scores all equal s = c^2 d / sqrt(d): L = s + ln 16 exactly. Errors: RuntimeError for any
    other value. A kernel that refuses the probe itself (a shape limit of its own) is assumed to use
    the natural log, with a warning (the GPU check's tests measure every kernel's base directly)."""
    key = (kernel, str(device), dtype)
    if key in _LSE_BASE:
        return _LSE_BASE[key]
    with _LSE_LOCK, torch.no_grad():
        scale = head_dim**-0.5
        q = torch.full((1, 1, 16, head_dim), (0.5 / (head_dim * scale)) ** 0.5, dtype=dtype, device=device)
        c = float(q.flatten()[0].double())
        natural = c * c * head_dim * scale + math.log(16.0)
        try:
            _, lse, _ = KERNELS[kernel].forward(q, q, q, None, 0.0, False, scale)
        except RuntimeError as e:
            warnings.warn(
                f"torch's {kernel} kernel refused the log-sum-exp probe ({str(e).splitlines()[0][:120]}); "
                "assuming the natural log",
                RuntimeWarning,
                stacklevel=2,
            )
            _LSE_BASE[key] = 1.0
            return 1.0
        got = float(lse_rows(lse, 16).double().mean())
        for ln_base in (1.0, math.log(2.0)):
            if abs(got * ln_base - natural) < 1e-2:
                _LSE_BASE[key] = ln_base
                return ln_base
        raise RuntimeError(
            f"torch's {kernel} kernel ({dtype}, {device}) returned a log-sum-exp of {got:.4f} for scores that "
            f"all equal {natural - math.log(16.0):.4f} over 16 keys: expected {natural:.4f} (natural log) or "
            f"{natural / math.log(2.0):.4f} (base 2); the sink rescale out * sigmoid(lse - a_h) needs the natural "
            f"log of the scaled scores"
        )


# ------------------------------------------------------------------------------------------------
# which kernel ran
# ------------------------------------------------------------------------------------------------
_RECORD = {"last": None, "counts": Counter()}


def sdpa_backend_record(reset: bool = False) -> dict:
    """{"last": name of the kernel the last sdpa call ran (or None), "counts": {name: calls}}.
    Names: ``SDPA_KERNELS``; a relaxed call adds "+causal_in_bias" / "+expanded_kv"."""
    rec = {"last": _RECORD["last"], "counts": dict(_RECORD["counts"])}
    if reset:
        _RECORD["last"] = None
        _RECORD["counts"].clear()
    return rec


def _note(name: str) -> None:
    _RECORD["last"] = name
    _RECORD["counts"][name] += 1


# ------------------------------------------------------------------------------------------------
# the autograd Functions
# ------------------------------------------------------------------------------------------------
class _SinkAttention(torch.autograd.Function):
    """q [b, h, sq, d], k/v [b, h_kv, sk, d] (strided views allowed) -> out [b, h, sq, d], through
    ``kernel`` with the sink as the LSE rescale (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, sink, kernel, scale, is_causal, bias, visible, dropout_p, ln_base):
        # Element-wise work on [b, h, sq, d] tensors is one in-place multiply (and one matmul in the
        # learnable backward); the rest is on [b, h, sq] row statistics.
        out, kernel_lse, rng = kernel.forward(q, k, v, bias, dropout_p, is_causal, scale)
        lse = lse_rows(kernel_lse, q.shape[2])
        if ln_base != 1.0:
            lse = lse * ln_base
        p_sink = None
        if sink is not None:
            a = sink.detach().to(lse.dtype).view(1, -1, 1)
            keep = torch.sigmoid(lse - a)  # 1 - P_sink, [b, h, sq]
            p_sink = torch.sigmoid(a - lse)  # P_sink = exp(a - L)
            lse = torch.logaddexp(lse, a)
            out.mul_(keep.unsqueeze(-1))  # fp32 math, one rounding to out's dtype
        if visible is not None:
            out.masked_fill_(~visible.unsqueeze(-1), 0.0)
            lse = lse.masked_fill(~visible, 0.0)  # finite: recomputed P = exp(-inf - 0) = 0
            if p_sink is not None:
                p_sink = p_sink.masked_fill(~visible, 0.0)
        if ln_base != 1.0:
            lse = lse / ln_base
        if sink is not None or visible is not None or ln_base != 1.0:  # else the kernel's own LSE goes back
            kernel_lse = lse_for_kernel(kernel_lse, lse)
        ctx.save_for_backward(q, k, v, out, kernel_lse, sink, p_sink, bias)
        ctx.kernel, ctx.rng, ctx.scale, ctx.is_causal, ctx.dropout_p = kernel, rng, scale, is_causal, dropout_p
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, sink, p_sink, bias = ctx.saved_tensors
        dout = dout.to(out.dtype)
        if ctx.kernel.name != "cpu_flash" and dout.stride() != out.stride():
            dout = torch.empty_like(out).copy_(dout)  # cuDNN's backward wants dO strided as O
        dq, dk, dv = ctx.kernel.backward(
            dout, q, k, v, out, lse, bias, ctx.dropout_p, ctx.is_causal, ctx.scale, ctx.rng
        )
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            delta = row_dot(dout, out, torch.promote_types(out.dtype, torch.float32))  # D = rowsum(dO * out)
            dsink = -(p_sink * delta).sum(dim=(0, 2)).to(sink.dtype)  # -sum P_sink * D
        return dq, dk, dv, dsink, None, None, None, None, None, None, None


class _HeadGate(torch.autograd.Function):
    """out [b, sq, h, d] * gate [b, sq, h] -> [b, sq, h, d] in out's dtype, each pass one kernel:
    the product in the wider dtype of the two with one rounding; d gate = rowsum(dO * out) as a
    batched matmul (fp32 accumulation, no rounded products: its cancellation would cost eps sqrt(d))."""

    @staticmethod
    def forward(ctx, out, gate):
        ctx.save_for_backward(out, gate)
        return torch.mul(out, gate.unsqueeze(-1), out=torch.empty_like(out))

    @staticmethod
    def backward(ctx, dgated):
        out, gate = ctx.saved_tensors
        dgated = dgated.to(out.dtype)
        dout = torch.mul(dgated, gate.unsqueeze(-1), out=torch.empty_like(out)) if ctx.needs_input_grad[0] else None
        dgate = None
        if ctx.needs_input_grad[1]:
            dgate = row_dot(dgated.transpose(1, 2), out.transpose(1, 2), out.dtype).transpose(1, 2).to(gate.dtype)
        return dout, dgate


def row_dot(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """sum_d x * y for [b, h, s, d] tensors -> [b, h, s] in ``dtype``, as one batched matmul over the
    memory order [b, s, h, d] that the kernels' outputs and their gradients have (no copies, one
    parallel region on CPU; fp32 accumulation on CUDA)."""
    xt, yt = x.transpose(1, 2).to(dtype), y.transpose(1, 2).to(dtype)
    if not (xt.is_contiguous() and yt.is_contiguous()):
        xt, yt = xt.contiguous(), yt.contiguous()
    return torch.matmul(xt.unsqueeze(-2), yt.unsqueeze(-1)).reshape(xt.shape[:-1]).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# masks and kernel choice
# ------------------------------------------------------------------------------------------------
def kernel_masks(b, sq, sk, causal, key_padding_mask, dtype, device, mask=None):
    """(is_causal for the kernel, additive bias or None, visible-row mask [b|1, 1|h, sq|1] or None).

    The visible-row mask is None when every row sees at least one key by construction. A dense
    ``mask`` (True = masked out) is combined with the others into one bias of its shape."""
    if mask is not None:
        from .reference import build_mask

        combined = build_mask(b, sq, sk, causal, key_padding_mask, device, mask)
        bias = torch.zeros(combined.shape, dtype=dtype, device=device).masked_fill_(combined, float("-inf"))
        return False, bias, ~combined.all(dim=-1)
    is_causal = causal and sq == sk
    bias = None
    if causal and sq != sk:
        bias = torch.zeros(1, 1, sq, sk, dtype=dtype, device=device).masked_fill_(
            causal_mask(sq, sk, device).view(1, 1, sq, sk), float("-inf")
        )
    if key_padding_mask is not None:
        pad = torch.zeros(b, 1, 1, sk, dtype=dtype, device=device).masked_fill_(
            ~key_padding_mask.view(b, 1, 1, sk), float("-inf")
        )
        bias = pad if bias is None else bias + pad
    visible = None
    if key_padding_mask is not None or (causal and sq > sk):
        # index of the last key row i may see; the row is visible iff a real key lies at or before it
        last = torch.arange(sq, device=device) + (sk - sq) if causal else torch.full((sq,), sk - 1, device=device)
        visible = (last >= 0).view(1, sq).expand(b, sq)
        if key_padding_mask is not None:
            real_before = key_padding_mask.cumsum(-1)  # [b, sk]
            visible = visible & (real_before[:, last.clamp(min=0)] > 0)
        visible = visible.reshape(b, 1, sq)
    return is_causal, bias, visible


def _causal_bias(sq: int, sk: int, dtype, device) -> torch.Tensor:
    return torch.zeros(1, 1, sq, sk, dtype=dtype, device=device).masked_fill_(
        causal_mask(sq, sk, device).view(1, 1, sq, sk), float("-inf")
    )


def choose_kernel(q, k, v, bias, dropout_p, is_causal, scale):
    """SDPA's choice for these kernel arguments (q [b, h, sq, d], k/v [b, h_kv, sk, d]):
    (kernel name, is_causal, bias, k, v), the arguments relaxed where torch's first answer was "no
    fused kernel": the causal mask folded into the bias, then GQA's K/V heads expanded. Raises
    SDPAUnavailable naming what was tried."""
    if q.device.type == "cpu":
        if dropout_p > 0:
            raise SDPAUnavailable(
                f"dropout_p={dropout_p}: torch's fused CPU kernel has no RNG state to hand to its "
                "backward (impl='torch' has dropout)"
            )
        return "cpu_flash", is_causal, bias, k, v
    if q.device.type not in ("cuda", "meta"):  # meta: as CUDA, for shape-only tests
        raise SDPAUnavailable(f"device {q.device}: torch's fused attention kernels are used on CUDA and CPU")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise SDPAUnavailable(f"dtype {q.dtype}: torch's fused CUDA kernels take float16, bfloat16 and float32")
    tried = []
    for fold in (False, True):
        if fold and not (is_causal and bias is not None):
            continue
        c_causal, c_bias = is_causal, bias
        if fold:
            c_causal, c_bias = False, bias + _causal_bias(q.shape[2], k.shape[2], bias.dtype, bias.device)
        for expand in (False, True):
            if expand and k.shape[1] == q.shape[1]:
                continue
            ck, cv = k, v
            if expand:
                g = q.shape[1] // k.shape[1]
                ck, cv = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            try:
                choice = int(
                    torch._fused_sdp_choice(
                        q, ck, cv, c_bias, dropout_p, c_causal, scale=scale, enable_gqa=ck.shape[1] != q.shape[1]
                    )
                )
            except RuntimeError as e:  # every enabled backend refused (sdpa_kernel pinned, math off)
                choice = f"none ({str(e).splitlines()[0][:80]})"
            tried.append(f"{'causal in bias, ' if fold else ''}{'K/V expanded, ' if expand else ''}choice {choice}")
            if choice in _CHOICE_NAMES:
                return _CHOICE_NAMES[choice], c_causal, c_bias, ck, cv
    raise SDPAUnavailable(
        f"torch {torch.__version__} has no fused CUDA attention kernel for {q.dtype} head_dim={q.shape[-1]} "
        f"sq={q.shape[2]} sk={k.shape[2]} heads={q.shape[1]}/{k.shape[1]} bias={bias is not None} "
        f"dropout_p={dropout_p} ({'; '.join(tried)}; torch.nn.attention.SDPBackend: 1 flash, 2 efficient, 3 cudnn)"
    )


# ------------------------------------------------------------------------------------------------
# the entry point
# ------------------------------------------------------------------------------------------------
def sdpa_outeff_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    sink: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    kernel: Optional[str] = None,
) -> torch.Tensor:
    """``outeff_attention(impl="sdpa")`` for unclipped variants: q [b, sq, h, d], k/v [b, sk, h_kv, d]
    -> [b, sq, h, d] in q's dtype, on torch's fused kernels with the sink as the LSE rescale.

    sink: [h] sink logits (None = vanilla; differentiable for the learnable offset). gate [b, sq, h]
    multiplies each head's output. mask: dense bool (True = masked out). dropout_p: through the CUDA
    kernels' own RNG (the current CUDA generator, so megatron's RNG tracker forks apply). kernel: one
    of ``SDPA_KERNELS`` to force (tests); default SDPA's choice (``choose_kernel``), which
    ``torch.nn.attention.sdpa_kernel`` pins. Arguments are assumed validated by ``outeff_attention``.
    Errors: SDPAUnavailable (a ValueError) when no fused kernel serves the arguments.
    """
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if q.numel() == 0 or sk == 0:  # no query, or no key (every row fully masked: zeros); the kernels divide by these
        return torch.zeros_like(q) + 0.0 * (q.sum() + k.sum() + v.sum())
    dp = d
    if d % 8 and (
        q.device.type != "cpu" or kernel not in (None, "cpu_flash")
    ):  # as SDPA on CUDA: head dim to a multiple of 8
        dp = d + 8 - d % 8
        q, k, v = (torch.nn.functional.pad(t, (0, dp - d)) for t in (q, k, v))
    is_causal, bias, visible = kernel_masks(b, sq, sk, causal, key_padding_mask, q.dtype, q.device, mask)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    relaxed = ""
    if kernel is None:
        was_causal = is_causal
        kernel, is_causal, bias, kt, vt = choose_kernel(qt, kt, vt, bias, dropout_p, is_causal, scale)
        relaxed = "+causal_in_bias" if was_causal and not is_causal else ""
    elif kt.shape[1] != qt.shape[1] and kernel == "efficient":  # no GQA in the memory-efficient kernel
        g = h // kt.shape[1]
        kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
    name = kernel + relaxed
    if dropout_p > 0 and not KERNELS[kernel].dropout:
        raise SDPAUnavailable(f"dropout_p={dropout_p}: the {kernel} kernel has no RNG state to hand to its backward")
    impl = KERNELS[kernel]
    if bias is not None:
        if not impl.takes_bias:
            raise SDPAUnavailable(f"the {kernel} kernel takes no bias (key padding, dense masks, causal with sq != sk)")
        bias = impl.prepare_bias(bias, qt, kt)
    ln_base = 1.0 if q.device.type == "meta" else lse_base(kernel, q.device, q.dtype, dp)
    if kt.shape[1] != k.shape[2]:
        name += "+expanded_kv"
    _note(name)
    out = _SinkAttention.apply(
        qt, kt, vt, sink, impl, float(scale), bool(is_causal), bias, visible, float(dropout_p), ln_base
    ).transpose(1, 2)  # [b, sq, h, dp]
    if dp != d:
        out = out[..., :d]
    if gate is not None:
        out = _HeadGate.apply(out, gate)
    return out.contiguous()


def warn_fallback(reason: str, impl: str) -> None:
    """One warning per distinct reason: impl='auto' fell back from torch's fused kernels to ``impl``."""
    key = (reason, impl)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"outeff_attention(impl='auto'): {reason}; running impl={impl!r} instead", RuntimeWarning, stacklevel=3
        )
    _note(f"fallback:{impl}")


_WARNED: set = set()
