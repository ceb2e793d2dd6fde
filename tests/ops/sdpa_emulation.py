"""CPU stand-ins for torch's fused CUDA attention ops, for testing ``megatron_outeff/ops/sdpa_attention.py``
without a GPU.

Each stand-in has the name of the aten op it replaces and
1. binds its arguments against the INSTALLED torch's schema of that op (``bind``): positional count,
   keyword-only names, required arguments, and each value's type (Tensor / Tensor? / float / bool /
   SymInt / bool[4]); a call our adapters make that the real op would refuse fails here;
2. computes what the kernel computes, from the definition, in float64 (FlashAttention-2 semantics):
   forward: out = dropout(softmax(scale q k^T + bias)) v with its natural-log row LSE, returned in the
   op's own layout (flash [b, h, sq]; memory-efficient [b, h, ceil(sq / 32) * 32] with +inf in the
   padding, which must never leak; cuDNN [b, h, sq, 1]) and the op's RNG outputs; rows with no visible
   key give lse = -inf and a NaN output (the worst a kernel may do);
   backward: from ONLY what it is given (dO, q, k, v, out, L, bias, the RNG state): P = exp(S - L),
   the dropout mask redrawn from the seed, D = rowsum(dO * out), dS = P (dP - D) - as the kernels do.
The dropout mask of each forward is kept (``masks[seed]``) so that an oracle can apply the same one.
``lse_base`` = 2 makes a kernel with a base-2 LSE; ``lse_unscaled`` one whose LSE ignores the scale.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

_REAL = torch.ops.aten


def bind(op_name: str, args, kwargs) -> dict:
    """{argument name: value} as the installed torch's schema of aten::<op_name> binds them; AssertionError
    naming the mismatch otherwise."""
    schema = getattr(_REAL, op_name).default._schema
    params = list(schema.arguments)
    positional = [p for p in params if not p.kwarg_only]
    assert len(args) <= len(positional), (
        f"{op_name}: {len(args)} positional arguments, the schema takes {len(positional)}"
    )
    bound = {p.name: a for p, a in zip(positional, args)}
    names = {p.name for p in params}
    for key, value in kwargs.items():
        assert key in names, f"{op_name}: no argument named {key!r} (schema: {schema})"
        assert key not in bound, f"{op_name}: {key!r} given twice"
        bound[key] = value
    for p in params:
        if p.name not in bound:
            assert p.has_default_value(), f"{op_name}: required argument {p.name!r} missing"
            bound[p.name] = p.default_value
        _check_type(op_name, p, bound[p.name])
    return bound


def _check_type(op_name, p, value) -> None:
    t = str(p.type)
    ok = {
        "Tensor": lambda x: x is None or isinstance(x, torch.Tensor),  # None: an undefined tensor, as torch passes them
        "Optional[Tensor]": lambda x: x is None or isinstance(x, torch.Tensor),
        "float": lambda x: isinstance(x, (float, int)) and not isinstance(x, bool),
        "Optional[float]": lambda x: x is None or (isinstance(x, (float, int)) and not isinstance(x, bool)),
        "bool": lambda x: isinstance(x, bool),
        "SymInt": lambda x: isinstance(x, int) and not isinstance(x, bool),
        "int": lambda x: isinstance(x, int) and not isinstance(x, bool),
        "List[bool]": lambda x: (
            isinstance(x, (list, tuple)) and all(isinstance(e, bool) for e in x) and (p.N is None or len(x) == p.N)
        ),
    }.get(t)
    assert ok is not None, f"{op_name}: argument {p.name!r} of type {t}: not handled by the emulator"
    assert ok(value), f"{op_name}: argument {p.name!r} expects {t}, got {type(value).__name__} {value!r}"


class EmulatedKernels:
    """A stand-in for ``torch.ops.aten`` holding the six fused CUDA ops (and the real CPU ones)."""

    def __init__(self, lse_base: float = math.e, lse_unscaled: bool = False):
        self.lse_base, self.lse_unscaled = lse_base, lse_unscaled
        self.masks = {}
        self.calls = []
        self._seed = 1000
        real = _REAL
        self._scaled_dot_product_flash_attention_for_cpu = real._scaled_dot_product_flash_attention_for_cpu
        self._scaled_dot_product_flash_attention_for_cpu_backward = (
            real._scaled_dot_product_flash_attention_for_cpu_backward
        )

    # ---------------------------------------------------------------- the math of every kernel
    def _scores(self, q, k, bias, is_causal, scale, heads_must_match):
        b, h, sq, d = q.shape
        h_kv, sk = k.shape[1], k.shape[2]
        if heads_must_match:
            assert h_kv == h, f"memory-efficient kernel: {h_kv} kv heads for {h} query heads (no GQA)"
        assert h % h_kv == 0
        kk = k.double().repeat_interleave(h // h_kv, dim=1)
        s = (q.double() @ kk.transpose(-1, -2)) * (1.0 if scale is None else scale)
        if bias is not None:
            assert bias.dtype == q.dtype, f"bias dtype {bias.dtype} != q dtype {q.dtype}"
            s = s + bias.double()
        if is_causal:
            assert sq == sk, "is_causal with sq != sk: torch's kernels align it top-left, ours bottom-right"
            s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool).triu(1), float("-inf"))
        return s

    def _draw(self, shape, dropout_p):
        self._seed += 1
        gen = torch.Generator().manual_seed(self._seed)
        keep = torch.rand(shape, generator=gen, dtype=torch.float64) >= dropout_p
        self.masks[self._seed] = keep
        return self._seed

    def _forward(self, q, k, v, bias, dropout_p, is_causal, scale, heads_must_match, name):
        self.calls.append(name)
        s = self._scores(q, k, bias, is_causal, scale, heads_must_match)
        if self.lse_unscaled:
            lse = torch.logsumexp(s / scale, dim=-1)
        else:
            lse = torch.logsumexp(s, dim=-1)  # natural log
        p = torch.exp(s - lse.unsqueeze(-1))  # NaN on rows with no key
        seed = 0
        if dropout_p > 0:
            seed = self._draw(p.shape, dropout_p)
            p = p * self.masks[seed] / (1 - dropout_p)
        vv = v.double().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        out = (p @ vv).to(q.dtype)
        lse = lse / math.log(self.lse_base)
        return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32), seed

    def _backward(self, dout, q, k, v, out, lse_rows, bias, dropout_p, is_causal, scale, seed, heads_must_match):
        s = self._scores(q, k, bias, is_causal, scale, heads_must_match)
        p = torch.exp(s - lse_rows.double().unsqueeze(-1) * math.log(self.lse_base))
        drop = torch.ones_like(p) if dropout_p == 0 else self.masks[int(seed)].double() / (1 - dropout_p)
        g = q.shape[1] // k.shape[1]
        vv = v.double().repeat_interleave(g, dim=1)
        kk = k.double().repeat_interleave(g, dim=1)
        do = dout.double()
        dv = (p * drop).transpose(-1, -2) @ do
        dp = (do @ vv.transpose(-1, -2)) * drop
        delta = (do * out.double()).sum(-1, keepdim=True)  # D from the out it is given
        ds = p * (dp - delta)
        dq = (ds @ kk) * scale
        dk = (ds.transpose(-1, -2) @ q.double()) * scale

        def fold(x):  # GQA: the query heads of one kv head sum into it
            return x.view(x.shape[0], k.shape[1], g, *x.shape[2:]).sum(2)

        return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)

    # ---------------------------------------------------------------- the ops, schema-bound
    def _scaled_dot_product_flash_attention(self, *args, **kwargs):
        a = bind("_scaled_dot_product_flash_attention", args, kwargs)
        q, k = a["query"], a["key"]
        out, lse, seed = self._forward(
            q, k, a["value"], None, a["dropout_p"], a["is_causal"], a["scale"], False, "flash"
        )
        rng = torch.tensor([seed, 0], dtype=torch.uint64)
        return (
            out,
            lse,
            None,
            None,
            q.shape[2],
            k.shape[2],
            rng,
            torch.tensor(0, dtype=torch.uint64),
            torch.empty(0, dtype=q.dtype),
        )

    def _scaled_dot_product_flash_attention_backward(self, *args, **kwargs):
        a = bind("_scaled_dot_product_flash_attention_backward", args, kwargs)
        assert a["logsumexp"].shape == a["query"].shape[:3], "flash backward: LSE must be [b, h, sq]"
        return self._backward(
            a["grad_out"],
            a["query"],
            a["key"],
            a["value"],
            a["out"],
            a["logsumexp"],
            None,
            a["dropout_p"],
            a["is_causal"],
            a["scale"],
            a["philox_seed"][0].item(),
            False,
        )

    def _scaled_dot_product_efficient_attention(self, *args, **kwargs):
        a = bind("_scaled_dot_product_efficient_attention", args, kwargs)
        q, bias = a["query"], a["attn_bias"]
        assert a["compute_log_sumexp"] is True, "the sink needs the LSE"
        if bias is not None:
            assert bias.shape == (q.shape[0], q.shape[1], q.shape[2], a["key"].shape[2]), (
                f"bias {tuple(bias.shape)} not expanded"
            )
            assert all(s % 8 == 0 for s in bias.stride()[:-1]) and bias.stride(-1) == 1, (
                f"bias strides {bias.stride()} unaligned"
            )
        out, lse, seed = self._forward(
            q, a["key"], a["value"], bias, a["dropout_p"], a["is_causal"], a["scale"], True, "efficient"
        )
        sq = q.shape[2]
        padded = torch.full((*lse.shape[:-1], -(-sq // 32) * 32), float("inf"), dtype=lse.dtype)
        padded[..., :sq] = lse
        return out, padded, torch.tensor(seed), torch.tensor(0)

    def _scaled_dot_product_efficient_attention_backward(self, *args, **kwargs):
        a = bind("_scaled_dot_product_efficient_attention_backward", args, kwargs)
        q, lse = a["query"], a["logsumexp"]
        sq = q.shape[2]
        assert lse.shape == (*q.shape[:2], -(-sq // 32) * 32), f"efficient backward: LSE {tuple(lse.shape)} not padded"
        dq, dk, dv = self._backward(
            a["grad_out_"],
            q,
            a["key"],
            a["value"],
            a["out"],
            lse[..., :sq],
            a["attn_bias"],
            a["dropout_p"],
            a["is_causal"],
            a["scale"],
            a["philox_seed"].item(),
            True,
        )
        return dq, dk, dv, None

    def _scaled_dot_product_cudnn_attention(self, *args, **kwargs):
        a = bind("_scaled_dot_product_cudnn_attention", args, kwargs)
        q, k, bias = a["query"], a["key"], a["attn_bias"]
        assert a["compute_log_sumexp"] is True, "the sink needs the LSE"
        if bias is not None:
            assert torch.isfinite(bias).all(), "cuDNN bias with -inf (SDPA uses -65504 for cuDNN)"
        out, lse, seed = self._forward(
            q, k, a["value"], bias, a["dropout_p"], a["is_causal"], a["scale"], False, "cudnn"
        )
        return (out, lse.unsqueeze(-1), None, None, q.shape[2], k.shape[2], torch.tensor(seed), torch.tensor(0), None)

    def _scaled_dot_product_cudnn_attention_backward(self, *args, **kwargs):
        a = bind("_scaled_dot_product_cudnn_attention_backward", args, kwargs)
        q, lse = a["query"], a["logsumexp"]
        assert lse.shape == (*q.shape[:3], 1), f"cuDNN backward: LSE {tuple(lse.shape)} must be [b, h, sq, 1]"
        assert a["grad_out"].stride() == a["out"].stride(), "cuDNN backward: dO must be strided as O"
        return self._backward(
            a["grad_out"],
            q,
            a["key"],
            a["value"],
            a["out"],
            lse.squeeze(-1),
            a["attn_bias"],
            a["dropout_p"],
            a["is_causal"],
            a["scale"],
            a["philox_seed"].item(),
            False,
        )


def fake_choice(rules):
    """A stand-in for torch._fused_sdp_choice: rules(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa)
    -> SDPBackend value; every call is recorded in ``.calls``."""
    calls = []

    def choice(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
        bind("_fused_sdp_choice", (q, k, v, attn_mask, dropout_p, is_causal), dict(scale=scale, enable_gqa=enable_gqa))
        r = rules(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa)
        calls.append(
            SimpleNamespace(
                heads=(q.shape[1], k.shape[1]), mask=attn_mask is not None, causal=is_causal, gqa=enable_gqa, result=r
            )
        )
        return r

    choice.calls = calls
    return choice
