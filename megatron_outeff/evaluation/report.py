"""Outlier report for one or more Hugging Face model directories on the SAME evaluation data.

    ReportSettings(batch_size=8, top_k=8, n_sigma=6.0, skip_quant=False)   how a report measures
    collect_model_stats(model, blocks, settings=ReportSettings()) -> dict
    build_report(models: {label: path}, eval_data, calib_data=None, settings=ReportSettings(), ...) -> dict
    write_report(report, out_dir) -> [written paths]     (report.json, report.md, *.png; temp dir + rename)

Per model, per layer and component (attn_ln, attn_out, ffn_ln, fc2, layer = residual stream after the
layer, final_ln), with the paper's definitions (`megatron_outeff.metrics.OutlierCollector`; each
activation is one row per sample of tokens*dim values):
  inf_norm       per-sample max|x|, averaged over samples
  kurtosis       per-sample Pearson kurtosis mean((x-mu)^4) / (std^4 + 1e-6) (Gaussian = 3), averaged
  outlier_share  per-sample share of values with |x - mu| > n_sigma * std, averaged (Gaussian ~2e-9 at 6)
  top_channels   the hidden dimensions with the largest max|x| over all evaluated tokens, with values
Attention, per layer (mean over batch, heads and query rows):
  first_token_mass  attention probability on key 0
  sink_mass         1 - sum of the probabilities over the real keys (the share the implicit sink key
                    takes; Softmax_1 / learnable offset); 0 up to rounding for plain softmax
  OutEffOPT remote code: the probabilities are the input of each layer's `self_attn.softmax_quant`
  QuantPoint (after clipping), captured by a forward hook. Plain OPT: output_attentions=True with
  eager attention.
What a per-tensor quantizer sees (issue 21; metrics.outliers): per layer output MA = max_c |h_0,c| /
median |h|, RI = max |h_0| / max_(t>=1) |h_t| and the first-token norm ratio (means over sequences);
aggregates max_massive_activation, max_range_inflation, first_token_excess_norm (E = ratio - 1) and
the component with the largest max|x| / RMS of its whole tensor.
Aggregates (the paper's): max_inf_norm (all components), max_layer_inf_norm (residual stream; the
paper's OPT "max inf norm"), max_ffn_inf_norm (fc2), avg_kurtosis / max_kurtosis (all components);
plus max_outlier_share, mean first-token / sink mass, and the model's top outlier channels (max over
all components). Perplexities: `quant_eval.evaluate_quantization` (FP32, FP16, W8A8 simulated = the
paper's protocol, W8A8 deployable = compressed-tensors Linear-only).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from megatron_outeff.errors import OutEffError
from megatron_outeff.metrics import (
    attention_sink_mass,
    first_token_norm_ratio,
    hf_collector,
    hf_components,
    hf_decoder_layers,
    hf_embedding_modules,
    massive_activation_ratio,
    range_inflation,
)
from megatron_outeff.utils.atomic import atomic_output_dir, check_empty_output_dir
from megatron_outeff.utils.markdown import md_header, md_row

from .quant_eval import evaluate_quantization, load_hf_model, model_info
from .report_settings import ReportSettings

__all__ = [
    "ReportSettings",
    "collect_model_stats",
    "build_report",
    "write_report",
    "render_markdown",
    "plot_report",
    "HEADLINE_ROWS",
]

LAYER_KINDS = ("attn_ln", "attn_out", "ffn_ln", "fc2", "layer")
KIND_TITLES = {
    "attn_ln": "attention LayerNorm output",
    "attn_out": "attention out_proj output",
    "ffn_ln": "pre-FFN LayerNorm output",
    "fc2": "FFN fc2 output",
    "layer": "layer output (residual stream)",
    "final_ln": "final LayerNorm output",
}


def _softmax_points(model) -> list:
    """Per layer, the self_attn.softmax_quant module of our remote-code model (any family), else []."""
    layers = hf_decoder_layers(model)
    pts = [getattr(layer.self_attn, "softmax_quant", None) for layer in layers]
    return pts if all(p is not None for p in pts) else []


@torch.no_grad()
def collect_model_stats(model, blocks: torch.Tensor, settings: Optional[ReportSettings] = None) -> dict:
    """Outlier and attention statistics of `model` on `blocks` [n, s] (see the module doc), measured with
    ``settings`` (default ReportSettings()), which the result records."""
    settings = settings or ReportSettings()
    batch_size, top_k, n_sigma = settings.batch_size, settings.top_k, settings.n_sigma
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.shape[0] == 0:
        raise OutEffError(f"blocks must be a non-empty [n, seq] tensor, got {getattr(blocks, 'shape', type(blocks))}")
    n_layers = len(hf_decoder_layers(model))
    dev = next(model.parameters()).device
    collector = hf_collector(model, detail=True, n_sigma=n_sigma, top_k=top_k)
    acc = [{"first": 0.0, "sink": 0.0, "rows": 0} for _ in range(n_layers)]

    def add(i, probs, no_sink=False):
        m = attention_sink_mass(probs)
        if no_sink:  # plain softmax: rows sum to 1 by construction; 1 - sum is rounding noise
            m["sink_mass"] = 0.0
        rows = probs.shape[0] * probs.shape[1] * probs.shape[2]
        acc[i]["first"] += m["first_token_mass"] * rows
        acc[i]["sink"] += m["sink_mass"] * rows
        acc[i]["rows"] += rows

    # what a per-tensor quantizer sees at each layer output ([b, s, d]): MA, RI, the first-token norm
    # ratio (metrics.outliers), per batch weighted by its sequences = the mean over all sequences
    token_stats = [
        {"massive_activation": 0.0, "range_inflation": 0.0, "first_token_norm_ratio": 0.0, "n": 0}
        for _ in range(n_layers)
    ]

    def add_tokens(i, out):
        h = out[0] if isinstance(out, (tuple, list)) else out
        st, n = token_stats[i], h.shape[0]
        st["massive_activation"] += massive_activation_ratio(h, token_dim=1) * n
        st["range_inflation"] += range_inflation(h, token_dim=1) * n
        st["first_token_norm_ratio"] += first_token_norm_ratio(h, token_dim=1) * n
        st["n"] += n

    # where the first token's vector comes from: ||x_0|| at the token and position embeddings and at each
    # layer's attention (out_proj) and MLP (fc2) outputs, summed over sequences; HF OPT runs fc2 on
    # [b*s, d] rows (b-major): position 0 is every s-th row
    first_norm: dict[str, float] = {}
    seq_len = [blocks.shape[1]]

    def add_first(name, out):
        x = (out[0] if isinstance(out, (tuple, list)) else out).detach().double()
        x0 = x[:, 0] if x.dim() == 3 else x[:: seq_len[0]]
        first_norm[name] = first_norm.get(name, 0.0) + x0.norm(dim=-1).sum().item()

    # the model family's modules (models/family.py): OPT's out_proj / fc2 and token + position embeddings,
    # Llama's o_proj / mlp.down_proj and token embedding
    sources, named = hf_embedding_modules(model), hf_components(model)
    for i in range(n_layers):
        sources[f"layer{i}.attn_out"], sources[f"layer{i}.fc2"] = named[f"layer{i}.attn_out"], named[f"layer{i}.fc2"]
    points = _softmax_points(model)
    handles = [p.register_forward_hook(lambda mod, args, out, i=i: add(i, args[0])) for i, p in enumerate(points)]
    handles += [
        layer.register_forward_hook(lambda mod, args, out, i=i: add_tokens(i, out))
        for i, layer in enumerate(hf_decoder_layers(model))
    ]
    handles += [m.register_forward_hook(lambda mod, args, out, n=n: add_first(n, out)) for n, m in sources.items()]
    source = "softmax_quant QuantPoint input (forward hook)" if points else "output_attentions=True (eager attention)"
    was_training = model.training
    model.eval()
    try:
        with collector:
            for i in range(0, blocks.shape[0], batch_size):
                ids = blocks[i : i + batch_size].to(dev)
                if points:
                    model(input_ids=ids, use_cache=False)
                else:
                    out = model(input_ids=ids, use_cache=False, output_attentions=True)
                    if not out.attentions or any(a is None for a in out.attentions):
                        raise OutEffError(
                            "the model returned no attention probabilities; load it with attn_implementation='eager'"
                        )
                    for li, a in enumerate(out.attentions):
                        add(li, a, no_sink=True)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    summ = collector.summary()
    comps = summ["components"]
    layers = []
    for i in range(n_layers):
        row = {"index": i}
        for kind in LAYER_KINDS:
            row[kind] = comps[f"layer{i}.{kind}"]
        row["first_token_mass"] = acc[i]["first"] / acc[i]["rows"] if acc[i]["rows"] else math.nan
        row["sink_mass"] = acc[i]["sink"] / acc[i]["rows"] if acc[i]["rows"] else math.nan
        for key in ("massive_activation", "range_inflation", "first_token_norm_ratio"):
            row[key] = token_stats[i][key] / token_stats[i]["n"]
        layers.append(row)
    # Model-wide top outlier channels: max over components of each channel's max|x|. Exact from the
    # per-component top-k lists (a channel in the global top-k is in the top-k of its own argmax component).
    best: dict[int, tuple[float, str]] = {}
    for name, c in comps.items():
        for ch, v in zip(c["top_channels"], c["top_channel_values"]):
            if ch not in best or v > best[ch][0]:
                best[ch] = (v, name)
    top = sorted(best.items(), key=lambda kv: -kv[1][0])[:top_k]
    resid = [f"layer{i}.layer" for i in range(n_layers)]
    best_r: dict[int, float] = {}
    for name in resid:
        for ch, v in zip(comps[name]["top_channels"], comps[name]["top_channel_values"]):
            best_r[ch] = max(v, best_r.get(ch, -1.0))
    top_r = sorted(best_r.items(), key=lambda kv: -kv[1])[:top_k]
    fm = [r["first_token_mass"] for r in layers]
    sm = [r["sink_mass"] for r in layers]
    return {
        "aggregates": {
            "max_inf_norm": summ["max_inf_norm"],
            "max_layer_inf_norm": summ["max_layer_inf_norm"],
            "max_ffn_inf_norm": summ["max_ffn_inf_norm"],
            "avg_kurtosis": summ["avg_kurtosis"],
            "max_kurtosis": summ["max_kurtosis"],
            "max_outlier_share": max(c["outlier_share"] for c in comps.values()),
            "mean_first_token_mass": sum(fm) / len(fm),
            "mean_sink_mass": sum(sm) / len(sm),
            # issue 21: MA and RI (max over layer outputs), E = max first-token norm ratio - 1, and the
            # hooked component whose whole tensor has the largest max|x| / RMS
            "max_massive_activation": max(r["massive_activation"] for r in layers),
            "max_range_inflation": max(r["range_inflation"] for r in layers),
            "first_token_excess_norm": max(r["first_token_norm_ratio"] for r in layers) - 1.0,
            "max_absmax_over_rms": summ["max_absmax_over_rms"],
            "max_absmax_over_rms_component": summ["max_absmax_over_rms_component"],
        },
        "first_token_norm_sources": {n: v / blocks.shape[0] for n, v in first_norm.items()},
        "top_outlier_channels": [{"channel": ch, "max_abs": v, "component": name} for ch, (v, name) in top],
        "top_residual_channels": [{"channel": ch, "max_abs": v} for ch, v in top_r],
        "layers": layers,
        "final_ln": comps.get("final_ln"),
        "components": comps,
        "attention_source": source,
        "settings": dataclasses.asdict(settings),
    }


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "transformers", "compressed-tensors", "megatron-core", "matplotlib"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        repo = Path(__file__).resolve().parents[2]
        out["megatron_outeff_commit"] = (
            subprocess.run(
                ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        out["megatron_outeff_commit"] = None
    return out


def build_report(
    models: Mapping[str, str],
    eval_data,
    calib_data=None,
    settings: Optional[ReportSettings] = None,
    *,
    device=None,
    command: Optional[Sequence[str]] = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """The report dict for {label: model_dir}. eval_data / calib_data: `eval_data.EvalData` (calib
    may be None with skip_quant). Everything needed to reproduce goes in: command, versions, data."""
    if not models:
        raise OutEffError("no models given")
    settings = settings or ReportSettings()
    if not settings.skip_quant and (calib_data is None or not calib_data.batches):
        raise OutEffError("W8A8 perplexity needs calibration batches (or skip quantization)")
    report = {
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": list(command) if command is not None else list(sys.argv),
        "versions": _versions(),
        "device": str(device or "cpu"),
        "eval_data": eval_data.description,
        "calibration_data": None if calib_data is None else calib_data.description,
        "settings": dataclasses.asdict(settings),
        "models": {},
    }
    for label, path in models.items():
        log(f"[{label}] loading {path}")
        model = load_hf_model(path, device=device)
        info = model_info(model)
        if info["vocab_size"] is not None and int(eval_data.blocks.max()) >= info["vocab_size"]:
            raise OutEffError(
                f"model {label!r}: evaluation data holds token id {int(eval_data.blocks.max())} "
                f">= its vocab size {info['vocab_size']}"
            )
        log(f"[{label}] outlier statistics on {eval_data.blocks.shape[0]} blocks of {eval_data.blocks.shape[1]}")
        stats = collect_model_stats(model, eval_data.blocks, settings)
        log(f"[{label}] perplexity" + (" (quantization skipped)" if settings.skip_quant else " FP32 / FP16 / W8A8"))
        ppl = evaluate_quantization(
            path,
            eval_data.blocks,
            None if calib_data is None else calib_data.batches,
            model=model,
            batch_size=settings.batch_size,
            skip_quant=settings.skip_quant,
            log=log,
        )
        report["models"][label] = {"path": os.path.abspath(path), "model": info, **stats, "perplexity": ppl}
        del model
    return report


# --------------------------------------------------------------------------------------------- markdown
# (row title, getter, lower-is-better or None = no "best", format)
def _agg(key):
    return lambda m: m["aggregates"].get(key)


def _ppl(key):
    return lambda m: (m["perplexity"].get(key) or {}).get("ppl")


HEADLINE_ROWS = [
    ("max inf norm, residual stream (paper's OPT 'max inf norm')", _agg("max_layer_inf_norm"), True, "{:.4g}"),
    ("max inf norm, all components", _agg("max_inf_norm"), True, "{:.4g}"),
    ("max inf norm, FFN output (fc2)", _agg("max_ffn_inf_norm"), True, "{:.4g}"),
    ("avg kurtosis", _agg("avg_kurtosis"), True, "{:.4g}"),
    ("max kurtosis", _agg("max_kurtosis"), True, "{:.4g}"),
    ("max share of values beyond n sigma", _agg("max_outlier_share"), True, "{:.3e}"),
    (
        "top outlier channel (max abs)",
        lambda m: m["top_outlier_channels"][0]["max_abs"] if m["top_outlier_channels"] else None,
        None,
        None,
    ),
    ("massive activation MA = max_c |h_0,c| / median |h| (max layer)", _agg("max_massive_activation"), True, "{:.4g}"),
    ("range inflation RI = max |h_0| / max_(t>=1) |h_t| (max layer)", _agg("max_range_inflation"), True, "{:.4g}"),
    (
        "first-token excess norm E = ||h_0|| / median ||h_t|| - 1 (max layer)",
        _agg("first_token_excess_norm"),
        True,
        "{:.4g}",
    ),
    ("max |x| / RMS(x), largest component", _agg("max_absmax_over_rms"), True, "{:.4g}"),
    ("attention mass on first token (mean)", _agg("mean_first_token_mass"), None, "{:.4f}"),
    ("attention mass on sink (mean)", _agg("mean_sink_mass"), None, "{:.4f}"),
    ("ppl FP32", _ppl("fp32"), True, "ppl"),
    ("ppl FP16", _ppl("fp16"), True, "ppl"),
    ("ppl W8A8 simulated (paper protocol)", _ppl("w8a8_simulated"), True, "ppl"),
    ("ppl W8A8 deployable (compressed-tensors, Linear only)", _ppl("w8a8_deployable"), True, "ppl"),
    ("W8A8 simulated / FP32 ppl", lambda m: _ratio(m, "w8a8_simulated"), True, "{:.4f}"),
    (
        "W8A8 simulated: quantized activation tensors",
        lambda m: (m.get("perplexity") or {}).get("w8a8_simulated", {}).get("quantized_activations"),
        None,
        "{:d}",
    ),
    ("W8A8 deployable / FP32 ppl", lambda m: _ratio(m, "w8a8_deployable"), True, "{:.4f}"),
]


def _ratio(m, key):
    a, b = _ppl(key)(m), _ppl("fp32")(m)
    return None if a is None or b is None or not b else a / b


def _fmt(v, fmt):
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if fmt == "ppl":  # perplexity: 3 decimals, scientific once it is too large to read
        return f"{v:.4e}" if abs(v) >= 1e6 else f"{v:.3f}"
    return fmt.format(v)


def _variant(info) -> str:
    parts = [str(info.get("softmax", "?"))]
    if info.get("gate") not in (None, "none"):
        parts.append(f"gate={info['gate']}")
    if info.get("clip_gamma") is not None:
        parts.append(f"clip({info['clip_gamma']:.3g},{info.get('clip_zeta')})")
    return ", ".join(parts)


def _src(s) -> str:
    return ", ".join(map(str, s)) if isinstance(s, (list, tuple)) else str(s)


def render_markdown(report: dict) -> str:
    labels = list(report["models"])
    ms = [report["models"][label] for label in labels]
    ed = report["eval_data"]
    lines = ["# Outlier report", ""]
    lines.append(
        f"Created {report['created_utc']} on {report['device']}. Evaluation data: {ed.get('kind')} "
        f"`{_src(ed.get('source'))}`, {ed.get('blocks')} blocks x {ed.get('block_size')} tokens "
        f"({ed.get('tokens')} tokens)."
    )
    cd = report.get("calibration_data")
    if cd:
        lines.append(
            f"Calibration (W8A8): {cd.get('batches')} batches {cd.get('batch_sizes')} x {cd.get('block_size')} "
            f"tokens from {cd.get('kind')} `{_src(cd.get('source'))}`"
            + (f" ({cd['note']})." if cd.get("note") else ".")
        )
    lines.append(
        "Lower is better for every bold-able row; **bold** = best model. "
        f"Outlier share: values with |x - mean| > {report['settings']['n_sigma']} sigma."
    )
    lines += ["", *md_header(["", *labels])]
    lines.append(md_row(["variant", *(_variant(m["model"]) for m in ms)]))
    for title, get, lower, fmt in HEADLINE_ROWS:
        vals = [get(m) for m in ms]
        if all(v is None for v in vals):
            continue
        if title.startswith("top outlier channel"):
            cells = []
            for m in ms:
                t = m["top_outlier_channels"][0] if m["top_outlier_channels"] else None
                cells.append("-" if t is None else f"dim {t['channel']} ({t['max_abs']:.4g}, {t['component']})")
            lines.append(md_row([title, *cells]))
            continue
        finite = [v for v in vals if v is not None and math.isfinite(v)]
        best = (min(finite) if lower else max(finite)) if (lower is not None and finite and len(ms) > 1) else None
        cells = [(f"**{_fmt(v, fmt)}**" if best is not None and v == best else _fmt(v, fmt)) for v in vals]
        if title.startswith("max |x| / RMS"):  # named
            cells = [
                c if c == "-" else f"{c} ({m['aggregates'].get('max_absmax_over_rms_component')})"
                for c, m in zip(cells, ms)
            ]
        lines.append(md_row([title, *cells]))
    fp16_modes = {m["perplexity"].get("fp16", {}).get("note") for m in ms} - {None}
    for note in sorted(fp16_modes):
        lines.append(f"\nFP16: {note}.")
    lines.append(
        "\nW8A8 simulated = the paper's protocol (weights, activations, LayerNorms, embeddings, attention "
        "internals and residual sums fake-quantized; LM head float). W8A8 deployable = compressed-tensors "
        "int-quantized checkpoint (Linear layers only), reloaded with transformers. Different measurements."
    )
    lines.append("\nPlots: `inf_norm.png`, `kurtosis.png`, `ppl.png`.")

    for label, m in zip(labels, ms):
        lines += [
            "",
            f"## {label}",
            "",
            f"`{m['path']}` - {m['model']['class']}, {_variant(m['model'])}, "
            f"{m['model']['layers']} layers, hidden {m['model']['hidden_size']}. "
            f"Attention probabilities from {m['attention_source']}.",
            "",
        ]
        head = (
            ["layer"]
            + [f"inf norm {k}" for k in LAYER_KINDS]
            + [f"kurtosis {k}" for k in LAYER_KINDS]
            + ["outlier share (max)", "top residual dims", "first-token mass", "sink mass"]
        )
        lines += md_header(head)
        for row in m["layers"]:
            res = row["layer"]
            dims = ", ".join(f"{c}:{v:.3g}" for c, v in zip(res["top_channels"][:3], res["top_channel_values"][:3]))
            cells = (
                [str(row["index"])]
                + [f"{row[k]['inf_norm']:.4g}" for k in LAYER_KINDS]
                + [f"{row[k]['kurtosis']:.4g}" for k in LAYER_KINDS]
                + [
                    f"{max(row[k]['outlier_share'] for k in LAYER_KINDS):.2e}",
                    dims,
                    f"{row['first_token_mass']:.4f}",
                    f"{row['sink_mass']:.4f}",
                ]
            )
            lines.append(md_row(cells))
        f = m.get("final_ln")
        if f:
            dims = ", ".join(f"{c}:{v:.3g}" for c, v in zip(f["top_channels"][:3], f["top_channel_values"][:3]))
            lines.append(
                f"\nFinal LayerNorm output: inf norm {f['inf_norm']:.4g}, kurtosis {f['kurtosis']:.4g}, "
                f"outlier share {f['outlier_share']:.2e}, top dims {dims}."
            )
        src = m.get("first_token_norm_sources") or {}
        if src:
            lines.append(
                "\nFirst token's vector by source (||x_0||, mean over sequences; out_proj / fc2 with bias): "
                + ", ".join(f"{n} {v:.4g}" for n, v in src.items())
                + "."
            )
        tops = ", ".join(
            f"dim {t['channel']} = {t['max_abs']:.4g} ({t['component']})" for t in m["top_outlier_channels"][:5]
        )
        lines.append(f"\nTop outlier dimensions (all components): {tops}.")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- plots
def plot_report(report: dict, out_dir) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker

    out_dir = Path(out_dir)
    labels = list(report["models"])
    ms = [report["models"][label] for label in labels]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 0.8 / len(labels)
    written = []

    for metric, ylabel, fname in (
        ("inf_norm", "inf norm  (mean over samples of max|x|)", "inf_norm.png"),
        ("kurtosis", "kurtosis  (Pearson; Gaussian = 3)", "kurtosis.png"),
    ):
        kinds = list(LAYER_KINDS) + ["final_ln"]
        fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), sharey=True, constrained_layout=True)
        allv = []
        for ax, kind in zip(axes.flat, kinds):
            for j, (label, m) in enumerate(zip(labels, ms)):
                if kind == "final_ln":
                    xs, ys = [0], [m["final_ln"][metric] if m.get("final_ln") else math.nan]
                else:
                    xs = [r["index"] for r in m["layers"]]
                    ys = [r[kind][metric] for r in m["layers"]]
                allv += [y for y in ys if y is not None and math.isfinite(y) and y > 0]
                ax.bar([x - 0.4 + width * (j + 0.5) for x in xs], ys, width, label=label, color=colors[j % len(colors)])
            ax.set_yscale("log")
            ax.set_title(KIND_TITLES[kind])
            if kind == "final_ln":
                ax.set_xticks([0], ["final LayerNorm"])
                ax.set_xlim(-1, 1)
            else:
                n = len(ms[0]["layers"])
                ax.set_xticks(range(n))
                ax.set_xlabel("layer")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.grid(axis="y", which="both", alpha=0.3)
            if metric == "kurtosis":
                ax.axhline(3.0, color="grey", ls="--", lw=1)
        for ax in axes[:, 0]:
            ax.set_ylabel(ylabel)
        if allv:  # bars on a log axis need a common floor below every value, or they mislead
            axes.flat[0].set_ylim(min(allv) / 2, max(allv) * 2)
        axes.flat[0].legend(title="model")
        title = (
            "Per-layer inf norm (log scale)"
            if metric == "inf_norm"
            else "Per-layer kurtosis (log scale; dashed = Gaussian 3)"
        )
        fig.suptitle(
            f"{title} - {report['eval_data'].get('blocks')} blocks x {report['eval_data'].get('block_size')} tokens",
            fontsize=14,
        )
        fig.savefig(out_dir / fname, dpi=100)
        plt.close(fig)
        written.append(out_dir / fname)

    keys = [
        ("fp32", "FP32"),
        ("fp16", "FP16"),
        ("w8a8_simulated", "W8A8 simulated (paper)"),
        ("w8a8_deployable", "W8A8 deployable (Linear only)"),
    ]
    keys = [(k, t) for k, t in keys if any(k in m["perplexity"] for m in ms)]
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(labels) + 5), 5), constrained_layout=True)
    w = 0.8 / len(keys)
    for j, (k, t) in enumerate(keys):
        ys = [m["perplexity"].get(k, {}).get("ppl", math.nan) for m in ms]
        bars = ax.bar(
            [i - 0.4 + w * (j + 0.5) for i in range(len(labels))], ys, w, label=t, color=colors[j % len(colors)]
        )
        big = any(math.isfinite(y) and y >= 1e5 for y in ys)
        ax.bar_label(bars, fmt="%.4g", fontsize=8, padding=2, rotation=90 if big else 0)
    allp = [m["perplexity"].get(k, {}).get("ppl", math.nan) for m in ms for k, _ in keys]
    allp = [v for v in allp if math.isfinite(v) and v > 0]
    log_y = bool(allp) and max(allp) / min(allp) > 20
    if log_y:
        ax.set_yscale("log")
        ax.set_ylim(min(allp) / 2, max(allp) * (max(allp) / min(allp)) ** 0.3)  # headroom for the labels
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("perplexity (lower is better)" + (", log scale" if log_y else ""))
    ax.set_xlabel("model")
    ax.set_title("Perplexity: floating point vs W8A8")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9, title="evaluation")
    if not log_y:
        ax.margins(y=0.15)
    fig.savefig(out_dir / "ppl.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "ppl.png")
    return written


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")


check_out_dir = check_empty_output_dir  # callers check early, before any expensive work


def write_report(report: dict, out_dir) -> list[Path]:
    """report.json, report.md and the PNGs into out_dir (new or empty), via a temp dir + rename."""
    out_dir = check_out_dir(out_dir)
    with atomic_output_dir(out_dir) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=_json_default, allow_nan=True))
        (tmp / "report.md").write_text(render_markdown(report))
        pngs = plot_report(report, tmp)
    return [out_dir / "report.json", out_dir / "report.md"] + [out_dir / p.name for p in pngs]
