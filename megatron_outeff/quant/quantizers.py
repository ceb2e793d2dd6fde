"""Fake (simulated) quantizers for the paper's W8A8 protocol, and per-channel int8 weights for deployment.

One formula for every integer grid here (and the one compressed-tensors applies, in the same order):

    q     = clamp(round(x / scale + zero_point), qmin, qmax)      round = round-half-to-even (torch.round)
    x_hat = (q - zero_point) * scale

Symmetric b-bit (weights):  scale = absmax / (2^(b-1) - 1), zero_point = 0, grid [-2^(b-1), 2^(b-1) - 1].
    absmax / 127 (not / 127.5) keeps +-absmax exactly on the grid and -128 unused, so the grid is
    symmetric, as int8 kernels with symmetric weights (oneDNN, fbgemm, CUTLASS) expect.
Asymmetric b-bit (activations): range [lo, hi] widened to contain 0 (0 must be exact: padding,
    ReLU zeros), scale = (hi - lo) / (2^b - 1), zero_point = round(-lo / scale), grid [0, 2^b - 1].

Activation ranges follow the paper's protocol: running min-max with momentum 0.9
(r <- 0.9 r + 0.1 current; the first batch initialises r), where "current" is clipped at percentiles:
lo = the (100 - p)th and hi = the p-th percentile of x itself (p = 99.999), not of |x|. With an
asymmetric grid the two ends are estimated independently; a percentile of |x| would force a symmetric
range and waste half the grid on one-sided tensors (softmax probabilities, ReLU outputs).
Percentiles interpolate linearly between order statistics (numpy's / torch.quantile's default).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megatron_outeff.utils.finite import require_finite

__all__ = [
    "int_grid",
    "fake_quantize",
    "keep_nonfinite",
    "quantize_int",
    "symmetric_qparams",
    "asymmetric_qparams",
    "percentile",
    "mse_search_absmax",
    "WeightQuantizer",
    "ActivationQuantizer",
    "quantize_weight_per_channel",
    "CalibrationBatches",
]


def _check_bits(n_bits) -> None:
    if not isinstance(n_bits, int) or not 2 <= n_bits <= 16:
        raise ValueError(f"n_bits must be an int in [2, 16], got {n_bits!r}")


def int_grid(n_bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax): [-2^(b-1), 2^(b-1)-1] if symmetric (signed) else [0, 2^b - 1] (unsigned)."""
    _check_bits(n_bits)
    return (-(2 ** (n_bits - 1)), 2 ** (n_bits - 1) - 1) if symmetric else (0, 2**n_bits - 1)


def quantize_int(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as x's float dtype): clamp(round(x / scale + zero_point), qmin, qmax).

    In place on the one temporary (x / scale): activations are large and this runs per forward."""
    q = torch.div(x, scale)
    return q.add_(zero_point).round_().clamp_(qmin, qmax)


def fake_quantize(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize then dequantize: (clamp(round(x / scale + zp), qmin, qmax) - zp) * scale."""
    return (quantize_int(x, scale, zero_point, qmin, qmax) - zero_point) * scale


def keep_nonfinite(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``x_hat`` (a fresh tensor, changed in place) with NaN wherever ``x`` is NaN or +-inf, exact elsewhere.

    The quantized paths treat a non-finite value as the float path does, they propagate it: NaN already
    survives round and clamp, but clamp would turn +-inf into the grid's end, a finite value. x - x is
    0 for a finite x (adding it changes nothing) and NaN for NaN and +-inf. (compressed-tensors' own
    runtime, which we reproduce bit for bit on finite inputs, clamps +-inf.)"""
    return x_hat.add_(x - x)


def _positive_scale(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero tensor has range 0: any positive scale represents it exactly; use 1. Only a zero range:
    # a NaN or infinite range (non-finite data) is refused, never quietly given scale 1.
    require_finite(scale, "quantization range")
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def symmetric_qparams(absmax: torch.Tensor, n_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point=0) for a symmetric signed grid: scale = absmax / (2^(b-1) - 1)."""
    _, qmax = int_grid(n_bits, symmetric=True)
    absmax = torch.as_tensor(absmax, dtype=torch.float32)
    scale = _positive_scale(absmax / qmax)
    return scale, torch.zeros_like(scale)


def asymmetric_qparams(lo: torch.Tensor, hi: torch.Tensor, n_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) for an unsigned grid covering [min(lo, 0), max(hi, 0)]."""
    qmin, qmax = int_grid(n_bits, symmetric=False)
    lo, hi = torch.as_tensor(lo, dtype=torch.float32), torch.as_tensor(hi, dtype=torch.float32)
    require_finite(torch.stack(torch.broadcast_tensors(lo, hi)), "quantization range")  # before clamp hides a -inf
    lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    scale = _positive_scale((hi - lo) / (qmax - qmin))
    zero_point = torch.clamp(torch.round(-lo / scale), qmin, qmax)
    return scale, zero_point


def percentile(x: torch.Tensor, p: float) -> torch.Tensor:
    """p-th percentile (0..100) of all values of x, linear interpolation between order statistics.

    Uses kthvalue (no sort, no torch.quantile size limit of 2^24 elements)."""
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    if n == 0:
        raise ValueError("percentile of an empty tensor")
    pos = p / 100.0 * (n - 1)
    lo_i, hi_i = math.floor(pos), math.ceil(pos)
    v_lo = flat.kthvalue(lo_i + 1).values
    if hi_i == lo_i:
        return v_lo
    v_hi = flat.kthvalue(hi_i + 1).values
    return v_lo + (pos - lo_i) * (v_hi - v_lo)


def mse_search_absmax(w: torch.Tensor, n_bits: int = 8, ratios=None) -> torch.Tensor:
    """Clipping range for symmetric quantization minimising sum (Q(w) - w)^2 over candidate ranges
    ratio * max|w|. Default ratios: 0.01, 0.02, ..., 1.00. Ties keep the larger range.

    All candidates are evaluated at once ([ratios, values] blocks of <= 2^24 elements)."""
    qmin, qmax = int_grid(n_bits, symmetric=True)
    flat = w.detach().reshape(1, -1).float()
    absmax = flat.abs().max()
    ratios = (
        torch.arange(100, 0, -1, dtype=torch.float64) / 100
        if ratios is None
        else torch.as_tensor(ratios, dtype=torch.float64)
    )
    if ratios.numel() == 0 or not bool(((ratios > 0) & (ratios <= 1)).all()):
        raise ValueError(f"ratios must be a non-empty set of values in (0, 1], got {ratios.tolist()}")
    ratios = ratios.reshape(-1).sort(descending=True).values
    candidates = absmax * ratios.float()  # largest first, so argmin's first minimum is the larger range
    scales, zps = symmetric_qparams(candidates.reshape(-1, 1), n_bits)
    errors = torch.zeros(len(candidates), dtype=torch.float64)
    block = max(1, (1 << 24) // len(candidates))
    for i in range(0, flat.shape[1], block):
        chunk = flat[:, i : i + block]
        errors += (fake_quantize(chunk, scales, zps, qmin, qmax) - chunk).pow(2).sum(dim=1, dtype=torch.float64)
    return candidates[int(torch.argmin(errors))]


class _FakeQuantizer(nn.Module):
    """Common state: a grid, a (scale, zero_point) pair once calibrated, and calibrate/frozen modes."""

    def __init__(self, n_bits: int, symmetric: bool):
        super().__init__()
        self.n_bits = n_bits
        self.qmin, self.qmax = int_grid(n_bits, symmetric)
        self.symmetric = symmetric
        self.calibrating = True
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    def calibrate(self) -> "_FakeQuantizer":
        """Calibration mode: every forward updates the range (then quantizes with it)."""
        self.calibrating = True
        return self

    def freeze(self) -> "_FakeQuantizer":
        """Frozen mode: the range is fixed; forwards only quantize."""
        self.calibrating = False
        return self

    @property
    def calibrated(self) -> bool:
        return self.scale is not None

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            raise ValueError(f"{type(self).__name__} has no range: run it in calibration mode before freezing")
        return keep_nonfinite(
            x, fake_quantize(x, self.scale.to(x.dtype), self.zero_point.to(x.dtype), self.qmin, self.qmax)
        )

    def extra_repr(self) -> str:
        mode = "calibrating" if self.calibrating else "frozen"
        return f"n_bits={self.n_bits}, symmetric={self.symmetric}, {mode}"


class WeightQuantizer(_FakeQuantizer):
    """Symmetric per-tensor fake quantizer for weights; range by min-max (max|w|) or MSE grid search."""

    def __init__(self, n_bits: int = 8, method: str = "minmax", ratios=None):
        super().__init__(n_bits, symmetric=True)
        if method not in ("minmax", "mse"):
            raise ValueError(f"method must be 'minmax' or 'mse', got {method!r}")
        self.method, self.ratios = method, ratios

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            absmax = (
                w.detach().abs().max().float()
                if self.method == "minmax"
                else mse_search_absmax(w, self.n_bits, self.ratios)
            )
            self.scale, self.zero_point = symmetric_qparams(absmax, self.n_bits)
        return self._quantize(w)


class ActivationQuantizer(_FakeQuantizer):
    """Asymmetric (default) per-tensor fake quantizer for activations with a running min-max range.

    calibrating: current range = (percentile(x, 100 - p), percentile(x, p)) (plain min/max if
    percentile is None); running range <- momentum * running + (1 - momentum) * current, the first
    batch initialising it; then x is quantized with the running range (as in the authors' protocol,
    downstream layers see quantized inputs during calibration too).
    frozen: quantize with the stored range."""

    def __init__(
        self, n_bits: int = 8, symmetric: bool = False, momentum: float = 0.9, percentile: float | None = 99.999
    ):
        super().__init__(n_bits, symmetric)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if percentile is not None and not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100] or None, got {percentile}")
        self.momentum, self.percentile = momentum, percentile
        self.register_buffer("running_min", None)
        self.register_buffer("running_max", None)

    @torch.no_grad()
    def observe(self, x: torch.Tensor, what: str = "calibration activation") -> None:
        """Update the running range with ``x``; OutEffError naming ``what`` if x holds NaN or +-inf (a
        range from non-finite data would be garbage: NaN used to become scale 1)."""
        require_finite(x.detach(), what)
        if self.percentile is None:
            lo, hi = x.detach().min().float(), x.detach().max().float()
        else:
            lo, hi = percentile(x, 100.0 - self.percentile), percentile(x, self.percentile)
        if self.running_min is None:
            self.running_min, self.running_max = lo.clone(), hi.clone()
        else:
            m = self.momentum
            self.running_min = m * self.running_min + (1 - m) * lo
            self.running_max = m * self.running_max + (1 - m) * hi
        if self.symmetric:
            absmax = torch.maximum(self.running_min.abs(), self.running_max.abs())
            self.scale, self.zero_point = symmetric_qparams(absmax, self.n_bits)
        else:
            self.scale, self.zero_point = asymmetric_qparams(self.running_min, self.running_max, self.n_bits)

    def forward(self, x: torch.Tensor, what: str = "calibration activation") -> torch.Tensor:
        if x.numel() == 0:
            return x
        if self.calibrating:
            self.observe(x, what)
        return self._quantize(x)


class CalibrationBatches:
    """Counts the calibration batches: a forward pre-hook on the root model (each batch is one call of
    it), so that an error in a hook below can say "calibration batch k" (1-based). ``remove()`` when done."""

    def __init__(self, model: nn.Module):
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._step)

    def _step(self, _module, _args):
        self.count += 1

    def where(self, what: str) -> str:
        return f"{what}, calibration batch {self.count}"

    def remove(self) -> None:
        self._handle.remove()


def quantize_weight_per_channel(w: torch.Tensor, n_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 weights for deployment: (int8 [out, in], float32 scale [out, 1]).

    scale_o = max_i |w_oi| / 127, q = clamp(round(w / scale), -128, 127) (so w ~ q * scale)."""
    if n_bits != 8:
        raise ValueError(f"deployment weights are int8: n_bits must be 8, got {n_bits}")
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got {getattr(w, 'shape', type(w).__name__)}")
    require_finite(w.detach(), "weight")
    w = w.detach().float()
    qmin, qmax = int_grid(8, symmetric=True)
    scale, zp = symmetric_qparams(w.abs().amax(dim=1, keepdim=True), 8)
    return quantize_int(w, scale, zp, qmin, qmax).to(torch.int8), scale
