"""Cases and checks shared by the attention implementation tests (flash kernel, fused CPU path)."""

import torch

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
