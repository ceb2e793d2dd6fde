"""OrthoAdam against torch's AdamW (identity and signed-permutation rotations: bit for bit) and against
a float64 formula of its definition (Haar rotations), plus the rotations themselves."""

import pytest
import torch

from megatron_outeff.training.orthoadam import OrthoAdam, axis_rotation, haar_orthogonal, rotate

SHAPES = [(6, 5), (7,), (3, 4, 2), (1, 9)]
LR, BETAS, EPS, WD = 3e-2, (0.9, 0.95), 1e-8, 0.1
STEPS = 6


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _grads(seed=1):
    g = torch.Generator().manual_seed(seed)
    # heterogeneous scales per coordinate: where Adam's per-coordinate normalisation matters
    return [
        [torch.randn(s, generator=g) * torch.rand(s, generator=g).pow(4) * 10 for s in SHAPES] for _ in range(STEPS)
    ]


def _groups(params):
    # two groups as in training (decayed / not decayed), with the scheduler-style lr change below
    return [{"params": params[:2], "weight_decay": WD}, {"params": params[2:], "weight_decay": 0.0}]


def _run(make_optimizer, grads):
    params = _params()
    opt = make_optimizer(_groups(params))
    for k, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = LR * (k + 1) / STEPS  # a warmup: lr changes between steps
        opt.step()
    return params, opt


def _signed_permutation(n, gen):
    perm = torch.randperm(n, generator=gen)
    signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    q = torch.zeros(n, n)
    q[torch.arange(n), perm] = signs
    return q


@pytest.mark.parametrize("kind", ["identity", "signed_permutation"])
def test_rotations_that_commute_with_adam_reproduce_adamw_bit_for_bit(kind):
    gen = torch.Generator().manual_seed(7)

    def rotations(p):
        if kind == "identity":
            return [torch.eye(n) for n in p.shape]
        return [_signed_permutation(n, gen) for n in p.shape]

    grads = _grads()
    ref, ref_opt = _run(lambda groups: torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS), grads)
    got, got_opt = _run(lambda groups: OrthoAdam(groups, rotations, lr=LR, betas=BETAS, eps=EPS), grads)
    for a, b in zip(ref, got):
        assert torch.equal(a, b), (a - b).abs().max()
    # the saved state has AdamW's layout (step, exp_avg, exp_avg_sq); identity: the same moments
    for p_ref, p_got in zip(ref, got):
        s_ref, s_got = ref_opt.state[p_ref], got_opt.state[p_got]
        assert sorted(s_got) == sorted(s_ref) and torch.equal(s_got["step"], s_ref["step"])
        if kind == "identity":
            assert torch.equal(s_got["exp_avg"], s_ref["exp_avg"]) and torch.equal(
                s_got["exp_avg_sq"], s_ref["exp_avg_sq"]
            )


def _orthoadam_float64(params, grads, rotations):
    """The definition (module doc of orthoadam.py), written out in float64 for one parameter group
    layout as _run uses: W <- W (1 - lr wd) - lr * R^T(m_hat / (sqrt(v_hat) + eps))."""
    ws = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(w) for w in ws]
    v = [torch.zeros_like(w) for w in ws]
    b1, b2 = BETAS
    for k, step_grads in enumerate(grads):
        lr = LR * (k + 1) / STEPS
        t = k + 1
        for i, (w, g) in enumerate(zip(ws, step_grads)):
            qs = [q.double() for q in rotations[i]]
            wd = WD if i < 2 else 0.0
            gr = g.double()
            for axis, q in enumerate(qs):  # G' = G x_axis Q
                gr = torch.tensordot(q, gr, dims=([1], [axis])).movedim(0, axis)
            m[i] = b1 * m[i] + (1 - b1) * gr
            v[i] = b2 * v[i] + (1 - b2) * gr * gr
            u = (m[i] / (1 - b1**t)) / ((v[i] / (1 - b2**t)).sqrt() + EPS)
            for axis, q in enumerate(qs):  # U = U' x_axis Q^T
                u = torch.tensordot(q.t(), u, dims=([1], [axis])).movedim(0, axis)
            ws[i] = w * (1 - lr * wd) - lr * u
    return ws


def test_haar_rotation_changes_the_step_and_matches_the_float64_definition():
    init = _params()
    rotations = [
        [axis_rotation(n, seed=3, key=f"p{i}/axis{a}") for a, n in enumerate(p.shape)] for i, p in enumerate(init)
    ]
    by_param = {}

    def lookup(p):
        return by_param[id(p)]

    grads = _grads()
    params = _params()
    for p, r in zip(params, rotations):
        by_param[id(p)] = r
    opt = OrthoAdam(_groups(params), lookup, lr=LR, betas=BETAS, eps=EPS)
    for k, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = LR * (k + 1) / STEPS
        opt.step()
    want = _orthoadam_float64(_params(), grads, rotations)
    adamw, _ = _run(lambda groups: torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS), grads)
    for p, w, a, p0 in zip(params, want, adamw, init):
        moved = (w - p0.detach().double()).abs().max().item()  # how far the parameter travelled
        # float32 arithmetic against the float64 formula: within 1e-4 of the distance travelled
        assert (p.detach().double() - w).abs().max().item() <= 1e-4 * moved
        # and the rotation matters: AdamW's trajectory is far from it (> 5% of the distance)
        assert (a.detach().double() - w).abs().max().item() > 0.05 * moved


def test_haar_matrices_are_orthogonal_deterministic_and_blocked():
    q = haar_orthogonal(16, torch.Generator().manual_seed(0), torch.float64)
    torch.testing.assert_close(q.t() @ q, torch.eye(16, dtype=torch.float64), atol=1e-12, rtol=0)
    a = axis_rotation(10, seed=1, key="x")
    assert torch.equal(a, axis_rotation(10, seed=1, key="x"))
    assert not torch.equal(a, axis_rotation(10, seed=2, key="x")) and not torch.equal(
        a, axis_rotation(10, seed=1, key="y")
    )
    torch.testing.assert_close(a.t() @ a, torch.eye(10), atol=1e-6, rtol=0)
    blocked = axis_rotation(10, seed=1, key="x", block_size=4)  # 3 blocks: 4, 3, 3
    torch.testing.assert_close(blocked.t() @ blocked, torch.eye(10), atol=1e-6, rtol=0)
    mask = torch.zeros(10, 10, dtype=torch.bool)
    for s, e in ((0, 4), (4, 7), (7, 10)):
        mask[s:e, s:e] = True
    assert torch.all(blocked[~mask] == 0) and torch.all(blocked[mask] != 0)
    # rotate / inverse are each other's inverse, axis by axis
    x = torch.randn(4, 10, dtype=torch.float64)
    qs = [haar_orthogonal(4, torch.Generator().manual_seed(5), torch.float64), blocked.double()]
    torch.testing.assert_close(rotate(rotate(x, qs), qs, inverse=True), x)
    torch.testing.assert_close(rotate(x, qs), qs[0] @ x @ qs[1].t())


def test_bad_rotation_shapes_are_refused():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    p.grad = torch.ones(3, 2)
    with pytest.raises(ValueError, match="rotation of axis 1"):
        OrthoAdam([p], lambda q: [torch.eye(3), torch.eye(3)]).step()
    with pytest.raises(ValueError, match="1 matrices"):
        OrthoAdam([p], lambda q: [torch.eye(3)]).step()
