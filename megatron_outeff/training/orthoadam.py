"""OrthoAdam: AdamW whose moments live in a fixed random orthogonal basis per parameter.

Kaul et al. 2025 ("From attention to activation", arXiv 2410.17174) trace first-token massive
activations and channel outliers to Adam's per-coordinate scaling, and remove them by running Adam
in a rotated basis. For a parameter W with axes of lengths n_1..n_k, one orthogonal matrix per axis
Q_1..Q_k (fixed for the whole run); with G the gradient:

    G'  = G x_1 Q_1 x_2 Q_2 ... x_k Q_k              (for a matrix: G' = Q_1 G Q_2^T)
    m   = beta1 m + (1 - beta1) G'                     (the moments live in the rotated basis)
    v   = beta2 v + (1 - beta2) G' * G'
    U'  = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
    U   = U' x_1 Q_1^T ... x_k Q_k^T                   (for a matrix: U = Q_1^T U' Q_2)
    W  <- W (1 - lr wd) - lr U                         (decoupled weight decay, original basis)

``x_j Q`` multiplies axis j by Q. Every rounding step is torch's AdamW's (single-tensor path, the one
torch runs on CPU tensors), so with identity rotations the result is AdamW bit for bit; so it is with
any signed permutation (Adam's elementwise moments commute with one: a wiring check, not a method).
A Haar-random rotation is the method. Decoupled weight decay is linear, so decaying in the original
basis and in the rotated one is the same update; it is applied to W directly, as AdamW does.

Rotations (``axis_rotation``): an axis longer than ``block_size`` gets a block-diagonal rotation of
independent Haar blocks (sizes differ by at most one), which bounds the memory at
``block_size^2`` floats per block (a 50k-row vocabulary would need a 10 GB dense matrix). Each
block is seeded from (seed, the parameter's key, the axis, the block), so the rotations are
re-derivable from the configuration and never stored in a checkpoint. Under tensor parallelism a
rank rotates its local shard: on the split axis that is a block-diagonal rotation of the whole tensor
(one Haar block per rank, keyed by the rank; the training code passes those keys), on the other axes
the same rotation on every rank (replicated tensors stay replicated). See training/README.md.

State per parameter (torch AdamW's names, so checkpoints and training/elastic.py treat it alike):
``step`` (float32 scalar tensor), ``exp_avg``, ``exp_avg_sq`` (in the rotated basis).
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable, Iterable, Optional, Sequence

import torch

__all__ = ["OrthoAdam", "haar_orthogonal", "axis_rotation", "rotation_seed", "rotate", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 1024


def rotation_seed(seed: int, key: str) -> int:
    """A 63-bit generator seed from (seed, key), stable across processes and Python versions (sha256,
    not ``hash``)."""
    digest = hashlib.sha256(f"{int(seed)}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def haar_orthogonal(n: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An n x n orthogonal matrix drawn from the Haar measure: QR of a standard Gaussian matrix in
    float64 with the signs of R's diagonal moved into Q (Mezzadri 2007, "How to generate random
    matrices from the classical compact groups"; without the sign fix QR's output is not uniform)."""
    if n < 1:
        raise ValueError(f"n={n}: expected >= 1")
    a = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(dtype)


def axis_rotation(
    n: int, seed: int, key: str, block_size: int = DEFAULT_BLOCK_SIZE, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The fixed rotation of an axis of length n: Haar if n <= block_size, else block-diagonal with
    ceil(n / block_size) independent Haar blocks of sizes differing by at most one. Deterministic in
    (n, seed, key, block_size)."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: expected >= 1")
    blocks = max(1, math.ceil(n / block_size))
    sizes = [n // blocks + (1 if b < n % blocks else 0) for b in range(blocks)]
    out = torch.zeros(n, n, dtype=dtype)
    start = 0
    for b, size in enumerate(sizes):
        gen = torch.Generator().manual_seed(rotation_seed(seed, f"{key}/n{n}/block{b}of{blocks}"))
        out[start : start + size, start : start + size] = haar_orthogonal(size, gen, dtype)
        start += size
    return out


def rotate(x: torch.Tensor, rotations: Sequence[Optional[torch.Tensor]], inverse: bool = False) -> torch.Tensor:
    """x with axis j multiplied by rotations[j] (Q x along that axis; Q^T x if ``inverse``). None
    leaves an axis as it is. A new tensor; x is not modified."""
    if len(rotations) != x.dim():
        raise ValueError(f"{len(rotations)} rotations for a tensor of shape {tuple(x.shape)}")
    for axis, q in enumerate(rotations):
        if q is None:
            continue
        moved = x.movedim(axis, 0)
        flat = moved.reshape(moved.shape[0], -1)
        flat = (q.t() if inverse else q) @ flat
        x = flat.reshape(moved.shape).movedim(0, axis)
    return x


class OrthoAdam(torch.optim.Optimizer):
    """AdamW in a fixed rotated basis per parameter (module doc).

    params: parameters or param groups (``lr``, ``betas``, ``eps``, ``weight_decay`` per group, as
    for torch.optim.AdamW; other group keys are kept). rotations: callable(param) -> a sequence of one
    orthogonal matrix (or None: that axis not rotated) per axis of the parameter, called once per
    parameter at its first step; the result is cached, not part of ``state_dict`` (re-derivable).
    A 0-dim parameter is never rotated."""

    def __init__(
        self,
        params: Iterable,
        rotations: Callable[[torch.Tensor], Sequence[Optional[torch.Tensor]]],
        lr: float = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        if not lr >= 0.0:
            raise ValueError(f"lr={lr}: expected >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas}: expected each in [0, 1)")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"eps={eps}, weight_decay={weight_decay}: expected >= 0")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._rotation_fn = rotations
        self._rotations: dict[int, tuple] = {}

    def rotations_of(self, p: torch.Tensor) -> tuple:
        """The rotation per axis of ``p`` (cached; moved to p's device and dtype)."""
        rot = self._rotations.get(id(p))
        if rot is None:
            qs = tuple(self._rotation_fn(p)) if p.dim() > 0 else ()
            if len(qs) != p.dim():
                raise ValueError(f"rotations: {len(qs)} matrices for a parameter of shape {tuple(p.shape)}")
            for axis, q in enumerate(qs):
                if q is not None and tuple(q.shape) != (p.shape[axis], p.shape[axis]):
                    raise ValueError(
                        f"rotation of axis {axis}: shape {tuple(q.shape)} for a parameter of shape {tuple(p.shape)}"
                    )
            rot = tuple(None if q is None else q.to(device=p.device, dtype=p.dtype) for q in qs)
            self._rotations[id(p)] = rot
        return rot

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("OrthoAdam does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:  # torch AdamW's layout: a float32 step counter, then the moments
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                rot = self.rotations_of(p)
                rotated = any(q is not None for q in rot)
                grad = rotate(p.grad, rot) if rotated else p.grad
                exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                # The same operations, in the same order, as torch.optim.AdamW's single-tensor path.
                step_t += 1
                if wd != 0:
                    p.mul_(1 - lr * wd)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = step_t.item()
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                if not rotated:
                    p.addcdiv_(exp_avg, denom, value=-step_size)
                    continue
                # -step_size * m / d with addcdiv's rounding (0 + x is exact), rotated back, then added:
                # the same float32 result as p.addcdiv_ whenever the rotation is a signed permutation.
                update = torch.zeros_like(p).addcdiv_(exp_avg, denom, value=-step_size)
                p.add_(rotate(update, rot, inverse=True))
        return loss
