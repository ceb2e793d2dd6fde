"""The public entry point: ``outeff_attention``, dispatching (``dispatch.auto_impl``) to torch's fused
kernels with the sink (``sdpa_attention``), the Triton kernels, the CPU clipped path (``cpu_attention``)
or the PyTorch reference."""

from __future__ import annotations

from typing import Optional

import torch

from .cpu_attention import cpu_outeff_attention, cpu_unsupported_reason
from .dispatch import auto_impl, fallback_impl, mask_kind
from .gate import apply_output_gate
from .reference import (
    attention_scores,
    build_mask,
    compute_dtype,
    expand_kv_heads,
    outeff_attention_reference,
    outeff_softmax_reference,
)
from .sdpa_attention import SDPAUnavailable, sdpa_outeff_attention, warn_fallback
from .triton_env import interpreting
from .variants import Clip, resolve_sink, validate_attention_args


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting(device)


def outeff_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    softmax: str = "softmax1",
    n: float = 1.0,
    offset: Optional[torch.Tensor] = None,
    clip=None,
    gate: Optional[torch.Tensor] = None,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Outlier-efficient scaled dot-product attention.

    q: [batch, sq, heads, d]; k, v: [batch, sk, kv_heads, d] (kv_heads divides heads) -> [batch, sq, heads, d].

    softmax: "vanilla" | "softmax1" | "softmax_n" (uses ``n``, the n of softmax_n) | "learnable"
    (uses ``offset`` [heads]); the variants' math: ``megatron_outeff.ops.variants``.
    clip: None or (gamma, zeta): probabilities become clip((zeta - gamma) * p + gamma, 0, 1).
    gate: None, or values in (0, 1) multiplying the output after P @ V: [batch, sq, heads] (per-head gate,
    fused into the kernels that fuse it) or [batch, sq, heads, d] (elementwise gate: every impl runs
    ungated, then one multiply, ``gate.apply_output_gate``).
    causal: bottom-right aligned causal mask. key_padding_mask: bool [batch, sk], True = real token.
    mask: any dense bool mask broadcastable to [batch, heads, sq, sk] (each dim its size or 1), True =
    masked out (megatron-core's convention); combined with causal and key_padding_mask.
    scale: defaults to 1/sqrt(d). dropout_p: dropout on the (clipped) probabilities.
    impl: "auto" chooses (``dispatch.auto_impl``): every unclipped variant runs "sdpa" on CUDA (fp16 /
        bf16 / fp32, head dim <= 256) and on CPU (without dropout); clipped ones run "triton" on CUDA
        ("rowwise" with dropout or a dense mask) and "cpu" on CPU; dropout on CPU runs "torch".
    "sdpa" (torch's fused flash / cuDNN / memory-efficient kernels, SDPA's choice, with the sink as a
    sigmoid rescale of the output and the LSE; no clip; dropout on CUDA only), "torch" (the PyTorch
    reference), "cpu" (forced; CPU tensors, no dropout: "sdpa" unclipped, a lean materialised path
    clipped), "triton" (forced; on CPU only under TRITON_INTERPRET=1; no dense mask), "rowwise"
    (materialised scores + fused row softmax kernel).

    Errors: ValueError naming the bad argument (shapes, dtypes, devices, variant, clip, impl that
    cannot serve the arguments).
    """
    _, _, _, h, _, scale = validate_attention_args(q, k, v, gate, key_padding_mask, scale, dropout_p, impl, mask)
    sink = resolve_sink(softmax, n, offset, h, q.device)
    clip = Clip.parse(clip)
    masks = dict(causal=causal, key_padding_mask=key_padding_mask, mask=mask)
    if gate is not None and gate.dim() == 4:  # elementwise: a post-multiply, the same for every impl
        return apply_output_gate(_attention(q, k, v, softmax, scale, sink, clip, None, dropout_p, impl, **masks), gate)
    return _attention(q, k, v, softmax, scale, sink, clip, gate, dropout_p, impl, **masks)


def _attention(q, k, v, softmax, scale, sink, clip, gate, dropout_p, impl, *, causal, key_padding_mask, mask):
    """``outeff_attention`` on validated arguments: the sink resolved (``resolve_sink``), clip a ``Clip``
    or None, gate None or per head [b, sq, h]."""
    b, sq, h = q.shape[:3]
    sk = k.shape[1]
    # what every impl takes
    common = dict(scale=scale, sink=sink, gate=gate, causal=causal, key_padding_mask=key_padding_mask, mask=mask)
    kind = (q.device.type, dropout_p > 0, q.dtype, q.shape[-1], mask_kind(causal, key_padding_mask, mask))
    auto = impl == "auto"
    if auto:
        impl = auto_impl(kind[0], softmax, clip is not None, *kind[1:])
    if impl == "sdpa":
        if clip is not None:
            raise ValueError(
                "clip with impl='sdpa': torch's fused kernels never hold the normalised P the clip "
                "needs; use impl='auto', 'triton', 'cpu' or 'torch'"
            )
        try:
            return sdpa_outeff_attention(q, k, v, dropout_p=dropout_p, **common)
        except SDPAUnavailable as e:
            if not auto:
                raise ValueError(f"impl='sdpa': {e}; use impl='auto'") from None
            impl = fallback_impl(*kind)
            warn_fallback(str(e), impl)
    if impl in ("triton", "rowwise") and not triton_runs_on(q.device):
        raise ValueError(
            f"impl={impl!r} on device {q.device}: Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        )
    if impl == "cpu":
        reason = cpu_unsupported_reason(q.device, dropout_p)
        if reason is not None:
            raise ValueError(f"impl='cpu': {reason}; use impl='torch' or 'auto'")
        return cpu_outeff_attention(q, k, v, clip=clip, **common)
    if impl == "torch":
        return outeff_attention_reference(q, k, v, clip=clip, dropout_p=dropout_p, **common)
    if impl == "triton":
        if dropout_p > 0:
            raise ValueError(
                f"dropout_p={dropout_p} with impl='triton': the flash kernel has no dropout; use impl='rowwise' or 'auto'"
            )
        if mask is not None:
            raise ValueError(
                "mask with impl='triton': the flash kernel takes causal and key_padding_mask only; use impl='rowwise' or 'auto'"
            )
        from .flash_attention import flash_outeff_attention

        return flash_outeff_attention(
            q, k, v, scale=scale, sink=sink, clip=clip, gate=gate, causal=causal, key_padding_mask=key_padding_mask
        )
    # rowwise: materialise the scores with matmuls, fuse scale + mask + softmax variant + clip.
    from .row_softmax import fused_outeff_softmax

    vt = expand_kv_heads(v, h).transpose(1, 2)
    scores = attention_scores(q, k, q.dtype)
    mask = build_mask(b, sq, sk, causal, key_padding_mask, q.device, mask)
    p = fused_outeff_softmax(scores, scale=scale, sink=sink, mask=mask, clip=clip)  # q's dtype
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p, training=True)
    out = (p.to(vt.dtype) @ vt).transpose(1, 2)
    if gate is not None:
        out = out * gate.to(out.dtype).unsqueeze(-1)
    return out.contiguous()


def outeff_attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    softmax: str = "softmax1",
    n: float = 1.0,
    offset: Optional[torch.Tensor] = None,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The attention probabilities of ``outeff_attention`` before clipping (the same arguments but v,
    clip, gate and dropout), materialised: q [batch, sq, heads, d], k [batch, sk, kv_heads, d] ->
    [batch, heads, sq, sk], fp32 (fp64 for fp64 inputs). For monitoring (e.g. the attention mass on
    the sink, 1 - row sum), not for training: no kernel keeps this matrix.

    Scores q k^T in fp32; the softmax runs the fused row kernel on CUDA, the PyTorch reference
    elsewhere. Errors: as ``outeff_attention``.
    """
    _, sq, sk, h, _, scale = validate_attention_args(q, k, k, None, key_padding_mask, scale, 0.0, "auto", mask)
    sink = resolve_sink(softmax, n, offset, h, q.device)
    scores = attention_scores(q, k, compute_dtype(q.dtype))
    mask = build_mask(q.shape[0], sq, sk, causal, key_padding_mask, q.device, mask)
    if q.device.type == "cuda":
        from .row_softmax import fused_outeff_softmax

        return fused_outeff_softmax(scores, scale=scale, sink=sink, mask=mask)
    return outeff_softmax_reference(scores, scale=scale, sink=sink, mask=mask)
