"""The public entry point: ``outeff_attention``, dispatching to the Triton kernels, the CPU paths
(``cpu_attention``) or the PyTorch reference."""
from __future__ import annotations

from typing import Optional

import torch

from .cpu_attention import clipped_outeff_attention, cpu_unsupported_reason, sdpa_outeff_attention
from .reference import build_mask, expand_kv_heads, outeff_attention_reference
from .variants import Clip, resolve_sink, validate_attention_args


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors only under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    from ._triton_common import interpreting  # imports triton, so only when asked

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
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Outlier-efficient scaled dot-product attention.

    q: [batch, sq, heads, d]; k, v: [batch, sk, kv_heads, d] (kv_heads divides heads) -> [batch, sq, heads, d].

    softmax: "vanilla" | "softmax1" | "softmax_n" (uses ``n``) | "learnable" (uses ``offset`` [heads]).
    clip: None or (gamma, zeta): probabilities become clip((zeta - gamma) * p + gamma, 0, 1).
    gate: None or [batch, sq, heads] in (0, 1), multiplying each head's output after P @ V.
    causal: bottom-right aligned causal mask. key_padding_mask: bool [batch, sk], True = real token.
    scale: defaults to 1/sqrt(d). dropout_p: dropout on the (clipped) probabilities.
    impl: "auto" chooses:
        CUDA: "triton" (the flash kernel), or "rowwise" when dropout_p > 0;
        CPU:  "cpu" when dropout_p == 0 (unclipped: torch's fused CPU flash kernel + the sink as a
              sigmoid rescale, memory linear in sq; clipped: a lean materialised path), else "torch".
    "torch" (the PyTorch reference), "cpu" (forced; CPU tensors, no dropout), "triton" (forced; on CPU
    only under TRITON_INTERPRET=1), "rowwise" (materialised scores + fused row softmax kernel).

    Errors: ValueError naming the bad argument (shapes, dtypes, devices, variant, clip, impl that
    cannot serve the arguments).
    """
    _, sq, sk, h, _, scale = validate_attention_args(q, k, v, gate, key_padding_mask, scale, dropout_p, impl)
    sink = resolve_sink(softmax, n, offset, h, q.device)
    clip = Clip.parse(clip)

    if impl == "auto":
        if q.device.type != "cuda":
            impl = "cpu" if cpu_unsupported_reason(q.device, dropout_p) is None else "torch"
        else:
            impl = "rowwise" if dropout_p > 0 else "triton"
    if impl in ("triton", "rowwise") and not triton_runs_on(q.device):
        raise ValueError(
            f"impl={impl!r} on device {q.device}: Triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        )
    if impl == "cpu":
        reason = cpu_unsupported_reason(q.device, dropout_p)
        if reason is not None:
            raise ValueError(f"impl='cpu': {reason}; use impl='torch' or 'auto'")
        if clip is not None:
            return clipped_outeff_attention(
                q, k, v, scale=scale, clip=clip, sink=sink, gate=gate, causal=causal, key_padding_mask=key_padding_mask,
            )
        return sdpa_outeff_attention(
            q, k, v, scale=scale, sink=sink, gate=gate, causal=causal, key_padding_mask=key_padding_mask,
        )
    if impl == "torch":
        return outeff_attention_reference(
            q, k, v, scale=scale, sink=sink, clip=clip, gate=gate, causal=causal,
            key_padding_mask=key_padding_mask, dropout_p=dropout_p,
        )
    if impl == "triton":
        if dropout_p > 0:
            raise ValueError(f"dropout_p={dropout_p} with impl='triton': the flash kernel has no dropout; use impl='rowwise' or 'auto'")
        from .flash_attention import flash_outeff_attention

        return flash_outeff_attention(
            q, k, v, scale=scale, sink=sink, clip=clip, gate=gate, causal=causal,
            key_padding_mask=key_padding_mask,
        )
    # rowwise: materialise the scores with matmuls, fuse scale + mask + softmax variant + clip.
    from .row_softmax import fused_outeff_softmax

    b = q.shape[0]
    qt = q.transpose(1, 2)
    kt = expand_kv_heads(k, h).transpose(1, 2)
    vt = expand_kv_heads(v, h).transpose(1, 2)
    scores = qt @ kt.transpose(-1, -2)
    mask = build_mask(b, sq, sk, causal, key_padding_mask, q.device)
    p = fused_outeff_softmax(scores, scale=scale, sink=sink, mask=mask, clip=clip)  # q's dtype
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p, training=True)
    out = (p.to(vt.dtype) @ vt).transpose(1, 2)
    if gate is not None:
        out = out * gate.to(out.dtype).unsqueeze(-1)
    return out.contiguous()
