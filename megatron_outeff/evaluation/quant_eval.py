"""Perplexity of one Hugging Face model directory in FP32, FP16 and the two W8A8 forms.

    load_hf_model(model_dir, *, device=None, eager=False) -> model      (trust_remote_code=True)
    check_model_dir(model_dir) -> dict(config.json)                      (one-line OutEffError otherwise)
    check_runnable(model_dir, config, block_size=None) -> block size      (float model, <= max positions)
    check_device(device) -> device                                       (one-line OutEffError if absent)
    fp16_perplexity(model, blocks, ...) -> {"loss", "ppl", "tokens", "mode", "note"}
    simulated_w8a8_perplexity(model, blocks, calib_batches, ..., act_bits=8, exclude_first_token=False) -> {...}
    activation_bit_sweep(model, blocks, calib_batches, act_bits=(8, 6, 5, 4)) -> {..., "b_star"}   (dose-response)
    quantized_activation_ranges(model, blocks) -> {"tensors": {name: max|x| / RMS}, "max", "max_tensor"}
    deployable_w8a8_perplexity(model, blocks, calib_batches, out_dir, ...) -> {..., "dir"}
    evaluate_quantization(model_dir, blocks, calib_batches, *, skip_quant=False, ...) -> dict

The four numbers (all on the same blocks, token-weighted, `megatron_outeff.hf.perplexity`):
  fp32            the model in float32.
  fp16            the model cast with .half(). On CUDA that is real fp16 compute. On CPU torch 2.13
                  runs fp16 matmuls too (measured: works, slow for big models), so the same .half()
                  forward is used; if the fp16 forward raises (older CPU kernels), it falls back to
                  fp32 compute on fp16-ROUNDED weights and says so in "mode" / "note".
  w8a8_simulated  the paper's protocol (field notes section 2) via `apply_simulated_w8a8`: every
                  Linear / Embedding / LayerNorm weight and output and every QuantPoint (Q K^T, softmax
                  output, P V, residual sums) fake-quantized; LM head and gates excluded; activation
                  ranges calibrated on `calib_batches`. Like-for-like: a plain OPT (the vanilla
                  export) is evaluated through `quantizable_model`, OutEffOPT with softmax "vanilla",
                  so it has the same quantization points as every other variant.
  w8a8_deployable the Linear-only compressed-tensors "int-quantized" checkpoint written by
                  `export_compressed_tensors_w8a8` (calibrated on the same batches), reloaded with
                  transformers + compressed-tensors and evaluated as a consumer would load it.
The two W8A8 numbers measure different things (everything quantized vs Linear layers only).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from megatron_outeff.errors import OutEffError
from megatron_outeff.hf.perplexity import perplexity
from megatron_outeff.quant.export import calibration_fn

__all__ = [
    "SIMULATED_EXCLUDE",
    "check_model_dir",
    "check_runnable",
    "check_device",
    "load_hf_model",
    "model_info",
    "fp16_perplexity",
    "simulated_w8a8_perplexity",
    "quantizable_model",
    "deployable_w8a8_perplexity",
    "evaluate_quantization",
    "SWEEP_ACT_BITS",
    "check_bits",
    "first_token_mask",
    "sensitivity_bits",
    "activation_bit_sweep",
    "quantized_activation_ranges",
]

# LM head stays float (paper); per-head gates are not quantized (they are not Linear modules in our
# remote code, so this pattern is belt and braces). The elementwise gate's Linear, self_attn.gate_proj, is
# quantized like the other Linears (it does not match these patterns).
SIMULATED_EXCLUDE = ("lm_head", "*.gate", "*.gate.*")
PAPER_BLOCK_SIZE = 512  # tokens per evaluation / calibration block (paper)


def check_model_dir(model_dir) -> dict:
    """The parsed config.json of a Hugging Face model directory; ValueError (one line) if it is not one."""
    p = Path(model_dir)
    if not p.exists():
        raise OutEffError(f"model directory not found: {p}")
    if not p.is_dir():
        raise OutEffError(f"not a directory: {p}")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise OutEffError(f"{p} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OutEffError(f"{cfg}: not valid JSON ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise OutEffError(f"{cfg}: no model_type; not a Hugging Face model config")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise OutEffError(f"{p} holds no weights (*.safetensors / *.bin)")
    if any(p.glob("*.safetensors")):
        from megatron_outeff.models.hf_opt import check_hf_safetensors

        check_hf_safetensors(p)
    return config


def check_runnable(model_dir, config: dict, block_size: Optional[int] = None) -> int:
    """The block size (tokens) to run ``model_dir`` (its parsed ``config``, from check_model_dir) on:
    ``block_size``, or when None the paper's 512 capped at the model's max_position_embeddings.
    OutEffError (one line) for a quantized directory (quantization_config in config.json: the float one is
    needed) or a ``block_size`` beyond max_position_embeddings (the position table would be indexed past its end)."""
    if config.get("quantization_config"):
        raise OutEffError(
            f"{model_dir}: a quantized checkpoint (quantization_config in config.json); expected the "
            "float Hugging Face directory"
        )
    n_pos = config.get("max_position_embeddings")
    if block_size is None:
        return PAPER_BLOCK_SIZE if n_pos is None else min(PAPER_BLOCK_SIZE, n_pos)
    if n_pos is not None and block_size > n_pos:
        raise OutEffError(f"--block-size {block_size}: exceeds {model_dir}'s max_position_embeddings={n_pos}")
    return block_size


def check_device(device: Optional[str]) -> Optional[str]:
    """``device`` (a torch device string, None for the default) if this machine has it; OutEffError (one line,
    naming --device) for a malformed string or a CUDA device that is not there."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise OutEffError(f"--device {device}: expected a torch device such as cpu, cuda or cuda:1") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OutEffError(f"--device {device}: CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OutEffError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def load_hf_model(model_dir, *, device=None, dtype=torch.float32, eager: bool = True):
    """AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True) in eval mode, float32.
    eager=True asks for transformers' eager attention (needed for output_attentions on a plain OPT;
    our remote code runs eager only anyway)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir)
    kwargs = {"trust_remote_code": True, "dtype": dtype}
    if eager:
        kwargs["attn_implementation"] = "eager"
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (ValueError, TypeError):
        if not eager:
            raise
        # A model class that refuses the argument: load with its default (ours are eager only).
        del kwargs["attn_implementation"]
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def model_info(model) -> dict:
    """What a reader needs to know about the architecture/variant."""
    c = model.config
    info = {
        "class": type(model).__name__,
        "model_type": getattr(c, "model_type", None),
        "layers": getattr(c, "num_hidden_layers", None),
        "hidden_size": getattr(c, "hidden_size", None),
        "heads": getattr(c, "num_attention_heads", None),
        "vocab_size": getattr(c, "vocab_size", None),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    for k in ("softmax", "softmax_n", "gate", "clip_gamma", "clip_zeta"):
        if hasattr(c, k):
            info[k] = getattr(c, k)
    if _plain_family(model) is not None:  # a plain transformers export (OPT, Llama): vanilla attention
        info.update(softmax="vanilla", gate="none", clip_gamma=None)
    return info


def _plain_family(model):
    """The model family (models/family.py) of a plain transformers model (model_type 'opt', 'llama'), else None."""
    from megatron_outeff.models.family import FAMILIES

    mt = getattr(model.config, "model_type", None)
    return next((f for f in FAMILIES.values() if f.hf_model_type == mt), None)


def _device_of(model):
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def fp16_perplexity(model, blocks, *, batch_size: int = 8) -> dict:
    """Perplexity of a float16 copy of `model` (see module doc for CPU)."""
    import copy

    dev = _device_of(model)
    half = copy.deepcopy(model).half().eval()
    try:
        res = perplexity(half, blocks, batch_size=batch_size)
        res.update(mode="fp16", note=f"model.half() forward on {dev.type}")
    except RuntimeError as e:
        rounded = copy.deepcopy(model).eval()
        with torch.no_grad():
            for p in rounded.parameters():
                p.copy_(p.half().float())
        res = perplexity(rounded, blocks, batch_size=batch_size)
        res.update(
            mode="fp16_weights_fp32_compute",
            note=f"fp16 forward failed on {dev.type} ({str(e).splitlines()[0][:120]}); "
            "evaluated in fp32 after rounding the weights to fp16 (activations not rounded)",
        )
    finally:
        del half
    if not math.isfinite(res["loss"]):
        res["note"] += "; non-finite loss: activations overflow fp16"
    return res


def quantizable_model(model):
    """The model the simulated W8A8 protocol runs on: a plain transformers OPT (how vanilla models
    are exported) becomes the same weights in ``OutEffOPTForCausalLM`` with softmax "vanilla", whose
    QuantPoints (Q K^T, softmax output, P V, residual sums) put exactly the quantization points of
    the other variants into the baseline too (like-for-like: only variant-only modules such as gates
    differ). The float function is unchanged (same math, same weights). A plain Llama becomes
    ``OutEffLlamaForCausalLM`` likewise (its family's remote code: models/family.py). Other models are
    returned as is."""
    family = _plain_family(model)
    if family is None:
        return model
    config_class, model_class = family.hf_classes(plain=False)

    cfg = model.config.to_dict()
    for k in ("model_type", "architectures", "auto_map", "transformers_version"):
        cfg.pop(k, None)
    outeff = model_class(config_class(**cfg, softmax="vanilla")).to(dtype=next(model.parameters()).dtype)
    outeff.load_state_dict(model.state_dict(), strict=True)
    return outeff.to(_device_of(model)).eval()


def simulated_w8a8_perplexity(
    model,
    blocks,
    calib_batches,
    *,
    batch_size: int = 8,
    exclude: Sequence[str] = SIMULATED_EXCLUDE,
    act_bits: int = 8,
    weight_bits: int = 8,
    exclude_first_token: bool = False,
) -> dict:
    """The paper's simulated W8A8 perplexity (module doc), like-for-like: a plain OPT is evaluated
    through ``quantizable_model`` so every variant has the same quantized op set. The float model is
    not modified. act_bits / weight_bits: the grids (the paper: 8 / 8; ``activation_bit_sweep``).
    exclude_first_token: position 0 of every quantized activation stays in floating point and out of
    calibration (PrefixQuant-style; ``first_token_mask``)."""
    from megatron_outeff.quant import apply_simulated_w8a8
    from megatron_outeff.quant.points import is_quant_point

    check_bits(act_bits, "act_bits")
    check_bits(weight_bits, "weight_bits")
    model = quantizable_model(model)
    sim = apply_simulated_w8a8(
        model,
        calibration_fn(calib_batches, _device_of(model)),
        exclude=exclude,
        act_bits=act_bits,
        weight_bits=weight_bits,
        keep_float=first_token_mask if exclude_first_token else None,
    )
    res = perplexity(sim.model, blocks, batch_size=batch_size)
    n_points = sum(1 for n in sim.act_quantizers if is_quant_point(sim.model.get_submodule(n)))
    res.update(
        quantized_weights=len(sim.weight_quantizers),
        quantized_activations=len(sim.act_quantizers),
        quant_points=n_points,
        excluded=sim.excluded,
        uncalibrated=sim.uncalibrated,
        act_bits=act_bits,
        weight_bits=weight_bits,
        first_token_float=exclude_first_token,
        note=(
            f"paper protocol: W {weight_bits}-bit symmetric per-tensor min-max; A {act_bits}-bit asymmetric running "
            "min-max (momentum 0.9, 99.999th percentile); Linear/Embedding/LayerNorm weights+outputs"
            + (", Q K^T, softmax, P V, residual sums" if n_points else " (no attention-internal points)")
            + "; LM head and gates float; plain OPT evaluated through OutEffOPT(vanilla): same op set"
            + ("; position 0 kept in float and out of calibration" if exclude_first_token else "")
        ),
    )
    del sim
    return res


# --------------------------------------------------------------------------------------------------
# Quantization sensitivity as a dose-response (issue 21)
# --------------------------------------------------------------------------------------------------
SWEEP_ACT_BITS = (8, 6, 5, 4)
SENSITIVITY_TOLERANCE = 0.05  # b*: the fewest activation bits whose perplexity increase stays below 5%


def check_bits(bits, where: str = "bits") -> int:
    """``bits`` if it is an integer bit width in [2, 16] (the quantizers' grids), else OutEffError (one line)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise OutEffError(f"{where}={bits!r}: expected an integer bit width from 2 to 16")
    return bits


def first_token_mask(name: str, out: torch.Tensor, input_shape: tuple) -> torch.Tensor:
    """The entries of a quantized activation of an OutEffOPT model (``quantizable_model``) that belong
    to position 0, for ``input_shape`` (batch, seq): token-major tensors [b, s, ...] (embeddings,
    LayerNorms, q/k/v/out projections, the attention residual) at s = 0; rows r of flattened [b*s, d]
    tensors (HF OPT's FFN, its LayerNorm and residual) with r % s == 0; P V [b, H, s, d] at s = 0; the
    token x token tensors Q K^T and the softmax output ([b, H, s, s]: module names ``qk_quant`` /
    ``softmax_quant``) in row 0 and column 0 (every score of the first query and every score on the
    first key). A layout not listed is a ValueError naming the module (never a silent guess)."""
    if len(input_shape) != 2:
        raise ValueError(f"first_token_mask: expected input ids [batch, seq], got input shape {input_shape}")
    b, s = input_shape
    shape = tuple(out.shape)
    mask = torch.zeros(shape, dtype=torch.bool, device=out.device)
    if out.dim() == 4 and name.rsplit(".", 1)[-1] in ("qk_quant", "softmax_quant") and shape[2] == shape[3] == s:
        mask[:, :, 0, :] = True
        mask[:, :, :, 0] = True
    elif out.dim() == 4 and shape[0] == b and shape[2] == s:
        mask[:, :, 0] = True
    elif out.dim() == 3 and shape[0] in (b, 1) and shape[1] == s:
        mask[:, 0] = True
    elif out.dim() == 2 and shape[0] == b * s:
        mask[::s] = True
    else:
        raise ValueError(
            f"first_token_mask: {name}: output of shape {shape} has no known token axis for input {input_shape}"
        )
    return mask


def sensitivity_bits(increase: dict, tolerance: float = SENSITIVITY_TOLERANCE):
    """b* from {act_bits: relative perplexity increase}: the fewest bits b such that every swept width
    >= b increases perplexity by less than ``tolerance`` (so a non-monotone sweep cannot report a low
    b* above a failing width); None if even the widest fails."""
    ok = None
    for bits in sorted(increase, reverse=True):
        if not increase[bits] < tolerance:
            break
        ok = bits
    return ok


def activation_bit_sweep(
    model,
    blocks,
    calib_batches,
    *,
    act_bits: Sequence[int] = SWEEP_ACT_BITS,
    weight_bits: int = 8,
    batch_size: int = 8,
    tolerance: float = SENSITIVITY_TOLERANCE,
    fp32_ppl: Optional[float] = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """The paper's protocol (per-tensor static, the same op set for every model) at each activation
    width with ``weight_bits`` weights, once as is and once with position 0 in float and out of
    calibration. Returns {"fp32_ppl", "weight_bits", "tolerance", "all": {bits: {"ppl", "increase"}},
    "first_token_float": {...}, "b_star": {"all": b*, "first_token_float": b*}}; increase = ppl / fp32 - 1."""
    widths = [check_bits(b, "act_bits") for b in act_bits]
    if not widths or len(set(widths)) != len(widths):
        raise OutEffError(f"act_bits={list(act_bits)}: expected distinct bit widths")
    check_bits(weight_bits, "weight_bits")
    if fp32_ppl is None:
        fp32_ppl = perplexity(model, blocks, batch_size=batch_size)["ppl"]
    out = {"fp32_ppl": fp32_ppl, "weight_bits": weight_bits, "tolerance": tolerance, "b_star": {}}
    for key, excl in (("all", False), ("first_token_float", True)):
        points = {}
        for bits in widths:
            r = simulated_w8a8_perplexity(
                model,
                blocks,
                calib_batches,
                batch_size=batch_size,
                act_bits=bits,
                weight_bits=weight_bits,
                exclude_first_token=excl,
            )
            points[bits] = {"ppl": r["ppl"], "increase": r["ppl"] / fp32_ppl - 1.0}
            log(
                f"  W{weight_bits}A{bits}{' (position 0 float)' if excl else ''}: ppl {r['ppl']:.4f} "
                f"({points[bits]['increase']:+.2%})"
            )
        out[key] = points
        out["b_star"][key] = sensitivity_bits({b: p["increase"] for b, p in points.items()}, tolerance)
    return out


def quantized_activation_ranges(
    model, blocks, *, batch_size: int = 8, exclude: Sequence[str] = SIMULATED_EXCLUDE, exclude_first_token: bool = False
) -> dict:
    """max|x| / RMS(x) of every activation the simulated protocol quantizes (the same modules as
    ``simulated_w8a8_perplexity``: Linear / Embedding / LayerNorm outputs and QuantPoints, lm_head and
    gates excluded), each over all ``blocks`` (one tensor per module, as one per-tensor range sees it).
    exclude_first_token: over the entries outside ``first_token_mask``. Returns {"tensors": {name:
    ratio}, "max": the largest, "max_tensor": its module name}."""
    from megatron_outeff.quant.points import is_quant_point
    from megatron_outeff.quant.simulated import QUANTIZED_TYPES, _is_excluded

    model = quantizable_model(model)
    acc: dict[str, list] = {}
    shape = [()]
    handles = [
        model.register_forward_pre_hook(
            lambda m, args, kwargs: shape.__setitem__(0, tuple(kwargs["input_ids"].shape)), with_kwargs=True
        )
    ]

    def hook(name):
        def record(module, args, out):
            x = out.detach().to(torch.float64)
            if exclude_first_token:
                x = x[~first_token_mask(name, out, shape[0])]
            a = acc.setdefault(name, [0.0, 0.0, 0])
            if x.numel():
                a[0] = max(a[0], x.abs().max().item())
                a[1] += x.pow(2).sum().item()
                a[2] += x.numel()

        return record

    for name, module in model.named_modules():
        if (isinstance(module, QUANTIZED_TYPES) or is_quant_point(module)) and not _is_excluded(name, exclude):
            handles.append(module.register_forward_hook(hook(name)))
    dev = _device_of(model)
    try:
        with torch.no_grad():
            for i in range(0, blocks.shape[0], batch_size):
                model(input_ids=blocks[i : i + batch_size].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    ratios = {n: (a[0] / (a[1] / a[2]) ** 0.5 if a[1] > 0 else 0.0) for n, a in acc.items()}
    worst = max(ratios, key=ratios.get)
    return {"tensors": ratios, "max": ratios[worst], "max_tensor": worst}


def deployable_w8a8_perplexity(model, blocks, calib_batches, out_dir, *, batch_size: int = 8) -> dict:
    """Write the compressed-tensors W8A8 checkpoint of `model` to out_dir, reload it, evaluate it."""
    from transformers import AutoModelForCausalLM

    from megatron_outeff.quant import export_compressed_tensors_w8a8

    params = export_compressed_tensors_w8a8(model, calibration_fn(calib_batches, _device_of(model)), out_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out_dir), trust_remote_code=True).eval()
    reloaded.to(_device_of(model))
    res = perplexity(reloaded, blocks, batch_size=batch_size)
    res.update(
        quantized_linears=len(params),
        dir=str(out_dir),
        note="compressed-tensors int-quantized: Linear layers only (int8 per-channel W, static per-tensor "
        "symmetric int8 inputs), LM head float; reloaded with transformers",
    )
    del reloaded
    return res


def evaluate_quantization(
    model_dir,
    blocks: torch.Tensor,
    calib_batches: Optional[Sequence[torch.Tensor]] = None,
    *,
    model=None,
    device=None,
    batch_size: int = 8,
    skip_quant: bool = False,
    work_dir=None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """FP32, FP16, simulated and deployable W8A8 perplexity of one model directory on `blocks`.

    model: an already loaded float model of model_dir (else it is loaded). work_dir: where the
    deployable checkpoint is written (kept; default: a temporary directory, deleted).
    skip_quant: only FP32 and FP16. Returns {"fp32": {...}, "fp16": {...}, "w8a8_simulated": {...},
    "w8a8_deployable": {...}} (each {"loss", "ppl", "tokens", ...}, plus "seconds")."""
    if model is None:
        model = load_hf_model(model_dir, device=device)
    out = {}

    def timed(key, fn):
        log(f"  {key} ...")
        t0 = time.time()
        out[key] = fn()
        out[key]["seconds"] = round(time.time() - t0, 3)
        log(f"  {key}: ppl {out[key]['ppl']:.4f} ({out[key]['seconds']:.1f} s)")

    timed("fp32", lambda: perplexity(model, blocks, batch_size=batch_size))
    timed("fp16", lambda: fp16_perplexity(model, blocks, batch_size=batch_size))
    if skip_quant:
        return out
    if not calib_batches:
        raise OutEffError("W8A8 evaluation needs calibration batches")
    timed("w8a8_simulated", lambda: simulated_w8a8_perplexity(model, blocks, calib_batches, batch_size=batch_size))
    if work_dir is not None:
        timed(
            "w8a8_deployable",
            lambda: deployable_w8a8_perplexity(model, blocks, calib_batches, Path(work_dir), batch_size=batch_size),
        )
    else:
        with tempfile.TemporaryDirectory(prefix="outeff_w8a8_") as tmp:
            timed(
                "w8a8_deployable",
                lambda: deployable_w8a8_perplexity(
                    model, blocks, calib_batches, Path(tmp) / "w8a8", batch_size=batch_size
                ),
            )
            out["w8a8_deployable"]["dir"] = None  # deleted
    return out
