"""Deployable W8A8 export of a Hugging Face model to the compressed-tensors "int-quantized" format.

Scheme (Linear layers only; compressed-tensors covers nothing else):
  weights      int8, per output channel, symmetric: scale_o = max_i |w_oi| / 127,
               q = clamp(round(w / scale), -128, 127)                      (quantize_weight_per_channel)
  activations  static per-tensor (`tensor` strategy) int8 input quantization with scales from
               calibration; symmetric (default, zero point 0) or asymmetric (int8 zero point).

How compressed-tensors 0.20 applies it (read from compressed_tensors/quantization/lifecycle/
forward.py, forward_helpers.py and utils/helpers.py), which `simulate_w8a8_linear` reproduces op by op:
  x_hat = (clamp(round(x / s + z), -128, 127) - z) * s     round = torch.round (half to even)
  W_hat = q * scale_o, y = F.linear(x_hat, W_hat, b).
compressed-tensors' own observers would put the symmetric scale at absmax / 127.5 (its grid
[-128, 127] has range 255); we write our own scales (absmax / 127, -128 unused) - it stores and applies
whatever scale it is given. Asymmetric ranges use the same range -> (scale, zero point) mapping as
the simulated protocol (asymmetric_qparams, unsigned grid [0, 255]) shifted by -128 onto int8.

Activation ranges come from `ActivationQuantizer.observe` on the float model's Linear inputs:
running min-max (momentum 0.9), by default clipped at the 99.999th percentile as in the paper's
protocol; pass act_percentile=None for plain running min-max.

Written through compressed-tensors' own API: apply_quantization_config -> our scales into its
parameters -> ModelCompressor.compress_model -> save_pretrained -> ModelCompressor.update_config
(quantization_config in config.json). Output goes to a temporary sibling directory renamed into place
at the end, so a failure leaves nothing half-written; an existing non-empty directory is refused.
"""

from __future__ import annotations

import copy
import fnmatch
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megatron_outeff.errors import OutEffError
from megatron_outeff.utils.atomic import atomic_output_dir
from megatron_outeff.utils.finite import require_finite

from .quantizers import (
    ActivationQuantizer,
    CalibrationBatches,
    asymmetric_qparams,
    fake_quantize,
    keep_nonfinite,
    quantize_weight_per_channel,
    symmetric_qparams,
)

__all__ = [
    "LinearW8A8",
    "calibrate_w8a8_linears",
    "simulate_w8a8_linear",
    "simulate_w8a8_model",
    "export_compressed_tensors_w8a8",
]

INT8_MIN, INT8_MAX = -128, 127


@dataclass
class LinearW8A8:
    """One Linear's deployable W8A8 parameters, in compressed-tensors' conventions."""

    weight: torch.Tensor  # int8 [out, in]
    weight_scale: torch.Tensor  # float32 [out, 1]
    input_scale: torch.Tensor  # float32 (1,)
    input_zero_point: torch.Tensor  # int8 (1,), 0 when symmetric
    bias: torch.Tensor | None = None

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        require_finite(p.detach(), f"parameter {name!r}")


@torch.no_grad()
def calibrate_w8a8_linears(
    model: nn.Module,
    calibrate: Callable[[nn.Module], object],
    *,
    exclude: Iterable[str] = ("lm_head",),
    activation_symmetric: bool = True,
    act_percentile: float | None = 99.999,
    act_momentum: float = 0.9,
) -> dict[str, LinearW8A8]:
    """Per-channel int8 weights and static per-tensor input scales for every nn.Linear not excluded.

    `calibrate(model)` runs the FLOAT model on the calibration batches (observe-only pre-hooks, removed
    afterwards; the model is not modified)."""
    if not callable(calibrate):
        raise ValueError(f"calibrate must be a callable taking the model, got {type(calibrate).__name__}")
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    _check_finite(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _excluded(n, exclude)}
    if not linears:
        raise ValueError("no nn.Linear left to quantize after exclusions")
    observers = {
        n: ActivationQuantizer(8, symmetric=activation_symmetric, momentum=act_momentum, percentile=act_percentile)
        for n in linears
    }
    batches = CalibrationBatches(model)  # a NaN / inf input is refused naming the Linear and the batch
    handles = [
        m.register_forward_pre_hook(
            lambda mod, args, o=observers[n], n=n: o.observe(args[0], batches.where(f"Linear {n!r} input"))
        )
        for n, m in linears.items()
    ]
    was_training = model.training
    try:
        model.eval()
        calibrate(model)
    finally:
        for h in handles:
            h.remove()
        batches.remove()
        model.train(was_training)

    params = {}
    for name, lin in linears.items():
        obs = observers[name]
        if obs.running_min is None:
            raise ValueError(f"Linear {name!r} saw no input during calibration; expected every quantized Linear to run")
        if activation_symmetric:
            scale, zp = symmetric_qparams(torch.maximum(obs.running_min.abs(), obs.running_max.abs()), 8)
        else:
            # unsigned grid [0, 255] with zero point z  ==  int8 grid [-128, 127] with zero point z - 128
            scale, zp = asymmetric_qparams(obs.running_min, obs.running_max, 8)
            zp = zp - 128
        q, w_scale = quantize_weight_per_channel(lin.weight)
        params[name] = LinearW8A8(
            weight=q,
            weight_scale=w_scale,
            input_scale=scale.reshape(1).float(),
            input_zero_point=zp.reshape(1).to(torch.int8),
            bias=None if lin.bias is None else lin.bias.detach().clone(),
        )
    return params


def simulate_w8a8_linear(x: torch.Tensor, p: LinearW8A8) -> torch.Tensor:
    """Our emulation of compressed-tensors' W8A8 Linear: F.linear(fq(x), q * scale, bias). A NaN / +-inf
    input element stays non-finite (``keep_nonfinite``), as on the float path."""
    zp = p.input_zero_point.to(x.dtype)
    x_hat = keep_nonfinite(x, fake_quantize(x, p.input_scale.to(x.dtype), zp, INT8_MIN, INT8_MAX))
    return F.linear(x_hat, p.dequantized_weight().to(x.dtype), None if p.bias is None else p.bias.to(x.dtype))


class _SimulatedLinear(nn.Module):
    def __init__(self, p: LinearW8A8):
        super().__init__()
        self.p = p

    def forward(self, x):
        return simulate_w8a8_linear(x, self.p)


def simulate_w8a8_model(model: nn.Module, params: dict[str, LinearW8A8]) -> nn.Module:
    """A deep copy of `model` whose Linears named in `params` run simulate_w8a8_linear."""
    return replace_linears(model, params, _SimulatedLinear)


def replace_linears(
    model: nn.Module, params: dict[str, LinearW8A8], make: Callable[[LinearW8A8], nn.Module]
) -> nn.Module:
    """A deep copy of `model` (eval mode) with each nn.Linear named in `params` replaced by make(params[name])."""
    qmodel = copy.deepcopy(model).eval()
    for name, p in params.items():
        parent_name, _, child = name.rpartition(".")
        parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
        if not isinstance(getattr(parent, child), nn.Linear):
            raise ValueError(f"{name!r} is not an nn.Linear in this model")
        setattr(parent, child, make(p))
    return qmodel


def export_compressed_tensors_w8a8(
    model: nn.Module,
    calibrate: Callable[[nn.Module], object],
    out_dir: str | os.PathLike,
    *,
    exclude: Iterable[str] = ("lm_head",),
    activation_symmetric: bool = True,
    act_percentile: float | None = 99.999,
    act_momentum: float = 0.9,
) -> dict[str, LinearW8A8]:
    """Calibrate, quantize and write `model` (a float HF PreTrainedModel) to out_dir as an
    "int-quantized" compressed-tensors checkpoint; returns the per-Linear parameters written.

    The float model is not modified. out_dir must not exist or be empty."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )

    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise OutEffError(f"out_dir {out_dir!r} exists and is not empty; expected a new or empty directory")
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"expected a Hugging Face PreTrainedModel (with save_pretrained), got {type(model).__name__}")
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)

    params = calibrate_w8a8_linears(
        model,
        calibrate,
        exclude=exclude,
        activation_symmetric=activation_symmetric,
        act_percentile=act_percentile,
        act_momentum=act_momentum,
    )

    # The usual form consumers (vLLM) expect: target class Linear, ignore the excluded Linears by name.
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in params)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True, dynamic=False),
        input_activations=QuantizationArgs(
            num_bits=8, type="int", strategy="tensor", symmetric=activation_symmetric, dynamic=False
        ),
    )
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format="int-quantized")

    qmodel = copy.deepcopy(model).eval()
    apply_quantization_config(qmodel, config, show_progress=False)
    with torch.no_grad():
        for name, p in params.items():
            lin = qmodel.get_submodule(name)
            if getattr(lin, "quantization_scheme", None) is None:
                raise ValueError(f"compressed-tensors did not match Linear {name!r}")
            lin.weight_scale.data = p.weight_scale.to(lin.weight_scale.dtype).reshape(lin.weight_scale.shape)
            if hasattr(lin, "weight_zero_point"):
                lin.weight_zero_point.data.zero_()
            lin.input_scale.data = p.input_scale.to(lin.input_scale.dtype).reshape(lin.input_scale.shape)
            if hasattr(lin, "input_zero_point"):
                lin.input_zero_point.data = p.input_zero_point.to(lin.input_zero_point.dtype).reshape(
                    lin.input_zero_point.shape
                )
            elif not activation_symmetric:
                raise ValueError(f"compressed-tensors created no input_zero_point for asymmetric Linear {name!r}")
    compressor = ModelCompressor.from_pretrained_model(qmodel, quantization_format="int-quantized")
    compressor.compress_model(qmodel)

    # The int8 weights compressed-tensors produced must be exactly ours (same formula, same order).
    for name, p in params.items():
        written = qmodel.get_submodule(name).weight
        if written.dtype != torch.int8 or not torch.equal(written.detach().cpu(), p.weight):
            raise ValueError(f"compressed-tensors quantized {name!r} differently from quantize_weight_per_channel")

    with atomic_output_dir(out_dir) as tmp:
        qmodel.save_pretrained(str(tmp))
        compressor.update_config(str(tmp))
    return params
