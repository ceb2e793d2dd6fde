"""Cases and checks shared by the attention implementation tests (flash kernel, fused CPU path, torch's
CUDA kernels): the variants, the random inputs of one problem, one implementation's output and gradients,
and the comparison with an oracle's."""

import torch

from megatron_outeff.ops import outeff_attention

# every softmax variant; softmax_n with n above and below 1 (sink logit log n of either sign)
VARIANTS = {
    "vanilla": dict(softmax="vanilla"),
    "softmax1": dict(softmax="softmax1"),
    "softmax_n2.5": dict(softmax="softmax_n", n=2.5),
    "softmax_n0.5": dict(softmax="softmax_n", n=0.5),
    "learnable": dict(softmax="learnable"),
}
# learnable offsets: mixed signs, including large ones (sink dominates / sink negligible)
OFFSETS = [0.7, -1.3, 8.0, -8.0]
# against the reference on fp32 copies of the inputs: rounding of the results to the input dtype plus
# fp32 summation-order noise (README "Numerics")
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def assert_all_close(out, grads, ref, ref_grads, leaves, tol, atol=None, dtype=torch.float64):
    """The output and every gradient against the oracle's, compared in ``dtype``: all finite, each
    gradient present and in its leaf's dtype, within ``tol`` (torch.testing.assert_close);
    atol: {leaf name: atol} replacing tol's atol for that gradient."""
    assert torch.isfinite(out).all(), "non-finite output"
    torch.testing.assert_close(out.to(dtype), ref.to(dtype), **tol, msg=lambda m: f"output: {m}")
    for name, g in grads.items():
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == leaves[name].dtype, f"grad {name} dtype {g.dtype}"
        assert torch.isfinite(g).all(), f"non-finite gradient for {name}"
        t = dict(tol, atol=(atol or {}).get(name, tol["atol"]))
        torch.testing.assert_close(g.to(dtype), ref_grads[name].to(dtype), **t, msg=lambda m, n=name: f"grad {n}: {m}")


def make_inputs(b, sq, sk, h, h_kv, d, *, dtype, gate, variant, pad, hole=False, extreme=False, seed=0, device="cpu"):
    """(leaves, kw) of one attention problem, drawn on the CPU from ``seed`` and moved to ``device``: leaves q
    [b, sq, h, d], k and v [b, sk, h_kv, d] ~ N(0, 1) in ``dtype``; with ``extreme`` q and k instead integers
    times a power of two (q in 64 * [-64, 64], k in [-4, 4]: logits up to ~3e4, each exact in fp32); the
    learnable variant's per-head offset (OFFSETS; float64 for float64 inputs, else float32); with ``gate`` a
    gate [b, sq, h] in [0.01, 0.99]. kw: the variant's outeff_attention arguments; with ``pad`` a
    key_padding_mask [b, sk] (True = kept): tail padding in batch 0, head padding in the last batch and, with
    ``hole``, its middle key too."""
    gen = torch.Generator().manual_seed(seed)
    if extreme:
        q = torch.randint(-64, 65, (b, sq, h, d), generator=gen).float().mul(64)
        k = torch.randint(-4, 5, (b, sk, h_kv, d), generator=gen).float()
    else:
        q = torch.randn(b, sq, h, d, generator=gen)
        k = torch.randn(b, sk, h_kv, d, generator=gen)
    leaves = {"q": q, "k": k, "v": torch.randn(b, sk, h_kv, d, generator=gen)}
    if gate:
        leaves["gate"] = torch.rand(b, sq, h, generator=gen).mul(0.98).add(0.01)
    leaves = {n: t.to(device=device, dtype=dtype) for n, t in leaves.items()}
    if variant == "learnable":
        offset_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        leaves["offset"] = torch.tensor(
            [OFFSETS[i % len(OFFSETS)] for i in range(h)], dtype=offset_dtype, device=device
        )
    kw = dict(VARIANTS[variant])
    if pad:
        m = torch.ones(b, sk, dtype=torch.bool)
        m[0, sk - max(1, sk // 3) :] = False  # tail padding in batch 0
        m[-1, : max(1, sk // 4)] = False  # head padding in the last batch
        if hole:
            m[-1, sk // 2] = False
        kw["key_padding_mask"] = m.to(device)
    return leaves, kw


def dout_for(leaves, seed=1):
    """The upstream gradient: N(0, 1) of q's shape, drawn on the CPU from ``seed``, in q's dtype and device."""
    q = leaves["q"]
    return torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q.device, q.dtype)


def run_attention(leaves, kw, impl, dout, upcast=False):
    """outeff_attention(impl=``impl``, **kw) on fresh leaf copies (fp32 ones with ``upcast``), backward of
    ``dout``: (out, {leaf name: grad})."""
    xs = {n: (t.detach().float() if upcast else t.detach()).clone().requires_grad_(True) for n, t in leaves.items()}
    out = outeff_attention(xs["q"], xs["k"], xs["v"], offset=xs.get("offset"), gate=xs.get("gate"), impl=impl, **kw)
    out.backward(dout.to(out.dtype))
    return out.detach(), {n: t.grad for n, t in xs.items()}
