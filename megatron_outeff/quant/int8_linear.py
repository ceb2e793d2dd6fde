"""Real int8 Linear inference on CPU through oneDNN (`torch.ops.onednn.qlinear_pointwise`).

Built from an exported Linear (int8 weight [out, in], per-channel weight scale, static per-tensor
input scale and int8-grid zero point, as `calibrate_w8a8_linears` / compressed-tensors store them):

    codes = clamp(round(x / s_x + z), -128, 127) + 128      uint8 activations: compressed-tensors'
                                                            int8 codes, shifted onto oneDNN's uint8 grid
    y     = s_x * scale_o * sum_i (codes_i - z_u) q_oi + b_o   int32 accumulation in oneDNN, z_u = z + 128

The shift by 128 happens after rounding, on integers: round(x / s + z + 128) in fp32 is NOT the same
(adding 128 before rounding drops low bits of x / s, so values within ~1e-5 of a .5 tie round the other
way - seen as a 1e-3 difference in an OPT fc2 output before this was fixed).
reduce_range: CPUs without VNNI (AVX2 only) multiply u8 x s8 with vpmaddubsw, which adds pairs of
products into SATURATING int16: 255 * 127 * 2 > 32767, so 8-bit activations can be silently wrong.
With 7-bit activations (grid [0, 127], scale 2 s_x, zero point round(z_u / 2)) every pair fits and the
result is exact. Default (None): 7-bit unless the CPU reports VNNI (avx512_vnni / avx_vnni / amx),
whose instructions accumulate in int32. 7-bit activations are coarser than the exported scheme, so
with reduce_range the module approximates (not reproduces) the compressed-tensors model; it is always
exact against `emulate`, the same integer arithmetic in float64.

Threads (measured, tools/results/bench_int8_linear.txt): with 2 threads on a loaded machine the module
ran slower than fp32 although its GEMM was 5x faster, because of the activation quantization:
- torch.round (like floor) on CPU opens an OpenMP parallel region even for a few thousand elements,
  and on a loaded machine a region waits for its slowest thread to be scheduled again: ~30 ms per call
  at load ~10 on 2 cores, against 0.03 ms for an element-wise add of the same size;
- every other element-wise pass (divide, add, clamp, cast) opens one too above
  at::internal::GRAIN_SIZE (32768) elements.
The module therefore rounds with the fp32 round-to-nearest-even of the hardware ((y + 1.5 * 2^23) -
1.5 * 2^23 is exactly torch.round(y) for |y| <= 2^22, true after clamping to the grid: clamp before
round equals round before clamp for integer bounds), and, with 2 to INLINE_QUANTIZE_MAX_THREADS threads,
quantizes in row blocks of at most GRAIN_SIZE elements, which torch
runs inline on the calling thread (no parallel region; the pass is O(M K) against the GEMM's O(M K N),
a few ms at most for OPT-125m shapes). With one thread there are no regions and no blocks; with more
threads the passes run parallel. The codes are exactly
`quantize_int`'s (compressed-tensors' formula), tested bit for bit, near ties included.

Non-finite inputs: an integer code cannot hold NaN or +-inf (a NaN cast to uint8 becomes some code), so
the module marks every row whose input holds one (a float64 row sum: finite for any finite fp32 row)
and returns NaN for that whole row, as the float Linear does (one non-finite term makes every output
of its row non-finite) and as the simulated W8A8 path does (``quantizers.keep_nonfinite``). The row
sums run in the same inline row blocks as the codes.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["Int8Linear", "cpu_has_vnni", "int8_model"]

GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: smaller element-wise ops run inline
INLINE_QUANTIZE_MAX_THREADS = 4  # up to this many torch threads, quantize in inline row blocks
_RNE_MAGIC = 1.5 * 2.0**23  # fp32 (y + M) - M rounds y to the nearest integer, ties to even


@functools.lru_cache(maxsize=None)
def cpu_has_vnni() -> bool:
    """True if /proc/cpuinfo lists a VNNI / AMX int8 dot-product extension (Linux x86)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


class Int8Linear(nn.Module):
    """y = x W^T + b with int8 weights and static uint8 activations, computed by oneDNN."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        input_scale: float | torch.Tensor,
        input_zero_point: int | torch.Tensor = 0,
        bias: torch.Tensor | None = None,
        reduce_range: bool | None = None,
    ):
        super().__init__()
        if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
            raise ValueError("this torch build has no oneDNN qlinear_pointwise; expected a torch CPU build with oneDNN")
        if weight.dtype != torch.int8 or weight.dim() != 2:
            raise ValueError(f"weight must be int8 [out, in], got {weight.dtype} {tuple(weight.shape)}")
        out_features, in_features = weight.shape
        weight_scale = torch.as_tensor(weight_scale, dtype=torch.float32).reshape(-1)
        if weight_scale.numel() == 1:
            weight_scale = weight_scale.expand(out_features).clone()
        if weight_scale.numel() != out_features or not bool((weight_scale > 0).all()):
            raise ValueError(f"weight_scale must be {out_features} positive values, got {tuple(weight_scale.shape)}")
        s_x = float(torch.as_tensor(input_scale).reshape(-1)[0])
        z = int(torch.as_tensor(input_zero_point).reshape(-1)[0])
        if not s_x > 0:
            raise ValueError(f"input_scale must be > 0, got {s_x}")
        if not -128 <= z <= 127:
            raise ValueError(f"input_zero_point must be on the int8 grid [-128, 127], got {z}")
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")

        self.reduce_range = (not cpu_has_vnni()) if reduce_range is None else bool(reduce_range)
        self.in_features, self.out_features = in_features, out_features
        z_u = z + 128
        # x_zero_point / x_qmax: oneDNN's uint8 grid; _grid: (zero point, lo, hi, shift) of the rounding
        if self.reduce_range:
            self.x_scale, self.x_zero_point, self.x_qmax = 2.0 * s_x, min(max(round(z_u / 2), 0), 127), 127
            self._grid = (self.x_zero_point, 0, 127, 0)
        else:
            self.x_scale, self.x_zero_point, self.x_qmax = s_x, z_u, 255
            self._grid = (z, -128, 127, 128)
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("_w_zero_points", torch.zeros(out_features, dtype=torch.int64))
        self._packed = torch.ops.onednn.qlinear_prepack(self.weight, None)

    @classmethod
    def from_params(cls, p, reduce_range: bool | None = None) -> "Int8Linear":
        """From a LinearW8A8 (compressed_tensors_export.calibrate_w8a8_linears)."""
        return cls(p.weight, p.weight_scale, p.input_scale, p.input_zero_point, p.bias, reduce_range)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of x [..., in] on this module's activation grid (same shape as x): 8-bit,
        compressed-tensors' int8 codes clamp(round(x / s + z), -128, 127) (``quantize_int``) + 128;
        7-bit (reduce_range), clamp(round(x / (2 s) + z_7), 0, 127). A row holding NaN / +-inf gets
        meaningless codes: ``forward`` returns NaN for it."""
        return self._quantize(x)[0]

    def _quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uint8 codes like x, bool [rows of x]: the row holds a non-finite value)."""
        x = x.float()
        bad = torch.empty(x.shape[:-1], dtype=torch.bool)
        threads = torch.get_num_threads()
        if threads == 1 or threads > INLINE_QUANTIZE_MAX_THREADS or x.numel() <= GRAIN_SIZE:
            return self._codes(x, torch.empty(x.shape, dtype=torch.uint8), bad), bad
        flat = x.reshape(-1, self.in_features)
        codes = torch.empty(flat.shape, dtype=torch.uint8)
        flat_bad = bad.view(-1)
        rows = max(1, GRAIN_SIZE // self.in_features)
        for i in range(0, flat.shape[0], rows):
            self._codes(flat[i : i + rows], codes[i : i + rows], flat_bad[i : i + rows])
        return codes.reshape(x.shape), bad

    def _codes(self, x: torch.Tensor, out: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        zero_point, lo, hi, shift = self._grid
        # a row is non-finite iff its float64 sum is (fp32 values cannot overflow a float64 sum)
        torch.logical_not(torch.isfinite(x.sum(-1, dtype=torch.float64)), out=bad)
        y = torch.div(x, self.x_scale).add_(zero_point).clamp_(lo, hi)
        # (y + M) - M rounds half to even (exact for |y| <= 2^22); - (M - shift) adds the integer shift exactly
        return out.copy_(y.add_(_RNE_MAGIC).sub_(_RNE_MAGIC - shift))

    def forward_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The int8 GEMM alone, on [M, in] uint8 codes; float32 [M, out]."""
        return torch.ops.onednn.qlinear_pointwise(
            codes,
            self.x_scale,
            self.x_zero_point,
            self._packed,
            self.weight_scale,
            self._w_zero_points,
            self.bias,
            1.0,
            0,
            torch.float32,
            "none",
            [],
            "",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input last dim must be {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        codes, bad = self._quantize(x.reshape(-1, self.in_features))
        y = self.forward_codes(codes.contiguous())
        if bad.any():
            y[bad] = float("nan")  # non-finite in, non-finite out: as the float and simulated paths
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def emulate(self, x: torch.Tensor) -> torch.Tensor:
        """The same integer arithmetic in float64 (exact products and sums), for testing; NaN rows as ``forward``."""
        codes, bad = self._quantize(x.reshape(-1, self.in_features))
        acc = (codes.double() - self.x_zero_point) @ self.weight.double().t()
        y = acc * self.x_scale * self.weight_scale.double()
        if self.bias is not None:
            y = y + self.bias.double()
        y[bad] = float("nan")
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, reduce_range={self.reduce_range}"


def int8_model(model: nn.Module, params: dict, reduce_range: bool | None = None) -> nn.Module:
    """A deep copy of ``model`` (eval mode) whose Linears named in ``params`` (name -> LinearW8A8, as
    ``calibrate_w8a8_linears`` / ``export_compressed_tensors_w8a8`` return them) run ``Int8Linear``.

    Inference only (Int8Linear has no backward). Errors: ValueError if a name is not an nn.Linear."""
    from .compressed_tensors_export import replace_linears

    return replace_linears(model, params, lambda p: Int8Linear.from_params(p, reduce_range))
