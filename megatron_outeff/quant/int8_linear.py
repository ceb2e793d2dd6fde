"""Real int8 Linear inference on CPU through oneDNN (`torch.ops.onednn.qlinear_pointwise`).

Built from an exported Linear (int8 weight [out, in], per-channel weight scale, static per-tensor
input scale and int8-grid zero point, as `calibrate_w8a8_linears` / compressed-tensors store them):

    codes = clamp(round(x / s_x + z_u), 0, qmax)           uint8 activations (quantize_int)
    y     = s_x * scale_o * sum_i (codes_i - z_u) q_oi + b_o   int32 accumulation in oneDNN

The int8-grid zero point z (grid [-128, 127]) becomes z_u = z + 128 on oneDNN's uint8 grid [0, 255].
reduce_range: CPUs without VNNI (AVX2 only) multiply u8 x s8 with vpmaddubsw, which adds pairs of
products into SATURATING int16: 255 * 127 * 2 > 32767, so 8-bit activations can be silently wrong.
With 7-bit activations (grid [0, 127], scale 2 s_x, zero point round(z_u / 2)) every pair fits and the
result is exact. Default (None): 7-bit unless the CPU reports VNNI (avx512_vnni / avx_vnni / amx),
whose instructions accumulate in int32. 7-bit activations are coarser than the exported scheme, so
with reduce_range the module approximates (not reproduces) the compressed-tensors model; it is always
exact against `emulate`, the same integer arithmetic in float64.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .quantizers import quantize_int

__all__ = ["Int8Linear", "cpu_has_vnni"]


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
        if self.reduce_range:
            self.x_scale, self.x_zero_point, self.x_qmax = 2.0 * s_x, min(max(round(z_u / 2), 0), 127), 127
        else:
            self.x_scale, self.x_zero_point, self.x_qmax = s_x, z_u, 255
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
        """uint8 codes of x on this module's activation grid."""
        return quantize_int(x.float(), self.x_scale, self.x_zero_point, 0, self.x_qmax).to(torch.uint8)

    def forward_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """The int8 GEMM alone, on [M, in] uint8 codes; float32 [M, out]."""
        return torch.ops.onednn.qlinear_pointwise(
            codes, self.x_scale, self.x_zero_point, self._packed, self.weight_scale, self._w_zero_points,
            self.bias, 1.0, 0, torch.float32, "none", [], "",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input last dim must be {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self.forward_codes(self.quantize_input(x.reshape(-1, self.in_features)).contiguous())
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def emulate(self, x: torch.Tensor) -> torch.Tensor:
        """The same integer arithmetic in float64 (exact products and sums), for testing."""
        codes = self.quantize_input(x.reshape(-1, self.in_features)).double() - self.x_zero_point
        acc = codes @ self.weight.double().t()
        y = acc * self.x_scale * self.weight_scale.double()
        if self.bias is not None:
            y = y + self.bias.double()
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, reduce_range={self.reduce_range}"
