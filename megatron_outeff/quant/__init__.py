"""Quantization: the paper's simulated W8A8 protocol, compressed-tensors export, real int8 linears.

No Megatron / DeepSpeed dependency: everything works on plain torch modules and HF models."""

from .compressed_tensors_export import (  # compressed-tensors itself is imported only when exporting
    LinearW8A8,
    calibrate_w8a8_linears,
    export_compressed_tensors_w8a8,
    simulate_w8a8_linear,
    simulate_w8a8_model,
)
from .int8_linear import Int8Linear, cpu_has_vnni, int8_model
from .points import QuantPoint
from .quantizers import (
    ActivationQuantizer,
    WeightQuantizer,
    asymmetric_qparams,
    fake_quantize,
    int_grid,
    mse_search_absmax,
    percentile,
    quantize_int,
    quantize_weight_per_channel,
    symmetric_qparams,
)
from .simulated import SimulatedW8A8, apply_simulated_w8a8

__all__ = [
    "QuantPoint",
    "ActivationQuantizer",
    "WeightQuantizer",
    "asymmetric_qparams",
    "fake_quantize",
    "int_grid",
    "mse_search_absmax",
    "percentile",
    "quantize_int",
    "quantize_weight_per_channel",
    "symmetric_qparams",
    "SimulatedW8A8",
    "apply_simulated_w8a8",
    "LinearW8A8",
    "calibrate_w8a8_linears",
    "export_compressed_tensors_w8a8",
    "simulate_w8a8_linear",
    "simulate_w8a8_model",
    "Int8Linear",
    "int8_model",
    "cpu_has_vnni",
]
