"""The paper's simulated (fake-quantized) W8A8 protocol, applied to any torch model.

Quantized (field notes section 2): every nn.Linear weight and output, nn.Embedding weight and output,
nn.LayerNorm weight and output (RMSNorm for Llama-family models: torch's nn.RMSNorm and transformers'
per-model ``*RMSNorm`` classes, which are not its subclasses), and every QuantPoint output (Q K^T, softmax output, P V, residual
sums, where the model's attention inserts them). Weights: 8-bit symmetric per-tensor (min-max, or MSE
search). Activations: 8-bit asymmetric per-tensor, running min-max (momentum 0.9) clipped at the
99.999th percentile, calibrated on a few batches and then frozen. Biases stay float.
Not quantized: modules whose qualified name matches an `exclude` pattern (fnmatch), with their
children: by default the LM head ("lm_head"); a gate is excluded by naming it.

The float model is never modified: the protocol runs on a deep copy. A quantized weight is a new
Parameter on the copy, so a weight tied to an excluded module (OPT's embedding and LM head) unties:
the LM head keeps the float weight.
Only plain nn.Linear / nn.LayerNorm / RMSNorm / nn.Embedding (and subclasses) are recognised; tensor-parallel
linears of other libraries are not.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from megatron_outeff.utils.finite import require_finite

from .points import QuantPoint, is_quant_point
from .quantizers import ActivationQuantizer, CalibrationBatches, WeightQuantizer

__all__ = ["SimulatedW8A8", "apply_simulated_w8a8", "QUANTIZED_TYPES"]

QUANTIZED_TYPES = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.RMSNorm, QuantPoint)


def _is_quantized_type(module: nn.Module) -> bool:
    # transformers' RMSNorms (LlamaRMSNorm, ...) are their own nn.Module classes, named *RMSNorm
    return isinstance(module, QUANTIZED_TYPES) or is_quant_point(module) or type(module).__name__.endswith("RMSNorm")


@dataclass
class SimulatedW8A8:
    """The quantized copy and its quantizers, by module name."""

    model: nn.Module
    weight_quantizers: dict[str, WeightQuantizer] = field(default_factory=dict)
    act_quantizers: dict[str, ActivationQuantizer] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    uncalibrated: list[str] = field(default_factory=list)  # never ran in calibration; raise if used


def _is_excluded(name: str, patterns: Iterable[str]) -> bool:
    # A module is excluded if it or any parent matches a pattern.
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(p, pat) for p in prefixes for pat in patterns)


def apply_simulated_w8a8(
    model: nn.Module,
    calibrate: Callable[[nn.Module], object],
    *,
    exclude: Iterable[str] = ("lm_head",),
    weight_bits: int = 8,
    act_bits: int = 8,
    weight_method: str = "minmax",
    act_percentile: float | None = 99.999,
    act_momentum: float = 0.9,
    keep_float: Callable[[str, torch.Tensor, tuple], torch.Tensor | None] | None = None,
) -> SimulatedW8A8:
    """Deep-copy `model`, fake-quantize it, calibrate with `calibrate(qmodel)`, freeze; return it.

    `calibrate` runs the quantized copy on the calibration batches (the paper: 4 batches of 8 x 512),
    e.g. `lambda m: [m(ids) for ids in batches]`; it runs under torch.no_grad() in eval mode.
    The returned model is frozen and ready to evaluate.

    keep_float(name, output, input_shape) -> bool mask or None: entries of an activation left in
    floating point AND out of its calibration range (e.g. the first token, PrefixQuant-style);
    input_shape is the shape of the model's first tensor input of this forward ((batch, seq) for
    input ids). The quantizer then sees only the other entries: its range, and its grid, per tensor."""
    if not callable(calibrate):
        raise ValueError(f"calibrate must be a callable taking the model, got {type(calibrate).__name__}")
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    qmodel = copy.deepcopy(model).eval()
    result = SimulatedW8A8(model=qmodel)

    for name, module in list(qmodel.named_modules()):
        if not _is_quantized_type(module):
            continue
        if _is_excluded(name, exclude):
            result.excluded.append(name)
            continue
        weight = getattr(module, "weight", None)
        if not is_quant_point(module) and weight is not None:
            require_finite(weight.detach(), f"module {name!r} weight")
            wq = WeightQuantizer(weight_bits, method=weight_method)
            with torch.no_grad():
                qweight = wq(weight).detach()
            wq.freeze()
            # A new Parameter, not an in-place write: unties the weight from excluded sharers.
            module.weight = nn.Parameter(qweight, requires_grad=False)
            result.weight_quantizers[name] = wq
        aq = ActivationQuantizer(act_bits, symmetric=False, momentum=act_momentum, percentile=act_percentile)
        module.register_forward_hook(
            lambda mod, args, out, aq=aq, name=name: _quantize_except(
                aq,
                out,
                None if keep_float is None else keep_float(name, out, input_shape[0]),
                batches.where(f"module {name!r} output"),
            )
        )
        result.act_quantizers[name] = aq

    input_shape = [()]
    if keep_float is not None:  # the forward's input shape, for keep_float

        def record_shape(mod, args, kwargs):
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            input_shape[0] = () if first is None else tuple(first.shape)

        qmodel.register_forward_pre_hook(record_shape, with_kwargs=True)

    batches = CalibrationBatches(qmodel)  # a NaN / inf activation is refused naming the module and the batch
    try:
        with torch.no_grad():
            calibrate(qmodel)
    finally:
        batches.remove()
    unseen = [n for n, q in result.act_quantizers.items() if not q.calibrated]
    for q in result.act_quantizers.values():
        q.freeze()
    result.uncalibrated = unseen
    return result


def _quantize_except(aq: ActivationQuantizer, out: torch.Tensor, keep: torch.Tensor | None, what: str) -> torch.Tensor:
    """``aq`` on the entries of ``out`` outside ``keep`` (calibrating: their range only); the kept
    entries pass through in floating point. ``what`` names ``out`` in a non-finite refusal."""
    if keep is None:
        return aq(out, what)
    keep = keep.expand_as(out)
    res = out.clone()
    res[~keep] = aq(out[~keep], what)
    return res
