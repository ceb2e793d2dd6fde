"""Outlier metrics during training (the paper's inf norm / kurtosis; megatron_outeff.metrics).

Every ``logging.outlier_interval`` steps, one fixed validation micro-batch is run forward (eval mode,
no grad) with forward hooks on each local layer's attention LayerNorm, attention output projection,
pre-FFN LayerNorm, fc2, the layer output (residual stream) and the final LayerNorm. Each pipeline
stage measures its own layers (on TP rank 0 / DP rank 0); the summaries meet on the logging rank,
which writes ``outliers/layer{i}/{kind}/{inf_norm,kurtosis}`` and the paper's aggregates
``outliers/max_layer_inf_norm`` etc. Disabled (interval 0) nothing is built and no hook exists.

Attention mass: on the same probe batch, each OutEffCoreAttention also materialises its softmax
probabilities (before clipping; ``probe_probabilities``) and the monitor logs the mean mass on the
first key and on the sink (1 - row sum), ``outliers/layer{i}/attn_probs/{first_token_mass,sink_mass}``
and their means over layers, ``outliers/mean_first_token_mass`` / ``outliers/mean_sink_mass``. Only
on the probe step: the training path never materialises probabilities. TP rank 0's heads.

Token-wise outliers (same probe): per head, the mean first-key mass over all query rows (Gu et al.'s
alpha_h; ``outliers/sink_head_share_0.3`` = share of heads above 0.3, their Sink^0.3) and, when the
data source marks idle query rows (bigram_backcopy: non-trigger positions), over those rows only
(``outliers/layer{i}/attn_probs/first_token_mass_idle`` head mean, ``max_head_first_token_mass_idle``);
the first token's value-norm ratio (``outliers/layer{i}/value_norm_ratio``: ||v_0|| / median_t ||v_t||,
head mean) and residual-norm ratio (``outliers/layer{i}/layer/first_token_norm_ratio``, the layer
output); with position classes, the probe loss per class (``outliers/loss/{copy,bigram}``).

What a quantizer sees (same probe; issue 21): per hooked component ``.../absmax_over_rms`` (max|x| /
RMS of the whole tensor) and the largest, ``outliers/max_absmax_over_rms``; per layer output the
massive-activation ratio MA (``outliers/layer{i}/layer/massive_activation``: max_c |h_0,c| / median
|h|) and the range inflation RI (``.../range_inflation``: max|h_0| / max_{t>=1} |h_t|), their maxima
over layers ``outliers/max_massive_activation`` / ``outliers/max_range_inflation``, and E =
``outliers/first_token_excess_norm`` = max_first_token_norm_ratio - 1; where the first token's
vector comes from: ``outliers/embedding/first_token_norm``, ``outliers/layer{i}/{attn_out,fc2,layer}/first_token_norm``
(||x_0||, mean over the probe's sequences).

Notes: megatron's linear_proj / linear_fc2 return their output without the bias (added in the
fused bias-dropout-add), so attn_out / fc2 are measured before the bias. Under sequence parallelism
a TP rank holds a sequence slice, so the statistics are those of TP rank 0's slice.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .model import unwrap


def megatron_components(model) -> dict:
    """{'layer{i}.{kind}': module} for this stage's layers (i = global layer index) + 'final_ln'."""
    gpt = unwrap(model)
    comps = {}
    for layer in gpt.decoder.layers:
        i = layer.layer_number - 1
        # Post-LN layers (OPT-350m, models/opt_layers.py): the same LayerNorms as Hugging Face's
        # self_attn_layer_norm / final_layer_norm (metrics.outliers.hf_components), here placed
        # after the attention / FFN residual adds.
        post = hasattr(layer, "post_self_attn_layernorm")
        comps[f"layer{i}.attn_ln"] = layer.post_self_attn_layernorm if post else layer.input_layernorm
        comps[f"layer{i}.attn_out"] = layer.self_attention.linear_proj
        comps[f"layer{i}.ffn_ln"] = layer.post_mlp_layernorm if post else layer.pre_mlp_layernorm
        comps[f"layer{i}.fc2"] = layer.mlp.linear_fc2
        comps[f"layer{i}.layer"] = layer
    final = getattr(gpt.decoder, "final_layernorm", None)
    if final is not None:
        comps["final_ln"] = final
    return comps


def core_attentions(model) -> dict:
    """{'layer{i}': core attention} for this stage's layers whose core attention can report its
    probabilities (OutEffCoreAttention; megatron's DotProductAttention cannot)."""
    gpt = unwrap(model)
    return {
        f"layer{layer.layer_number - 1}": layer.self_attention.core_attention
        for layer in gpt.decoder.layers
        if hasattr(layer.self_attention.core_attention, "probe_probabilities")
    }


class _Hooks:
    """A context holding forward hooks (``__enter__`` registers them into ``handles``), removed on exit."""

    handles: tuple | list = ()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


class AttentionMassProbe(_Hooks):
    """Forward hooks that record, per core attention, the mean first-key and sink mass, the per-head
    first-key mass over all query rows (Gu et al.'s alpha_h) and over the ``idle`` rows if a query
    mask is set, and the first token's value-norm ratio, while active."""

    def __init__(self, attentions: dict):
        self.attentions = attentions
        self.values = {}
        self.idle = None  # [b, sq] bool: query rows where the task gives the head nothing to do

    def __enter__(self):
        from megatron_outeff.metrics.outliers import (
            attention_sink_mass,
            first_token_mass_per_head,
            first_token_norm_ratio,
        )

        def hook(name):
            def record(module, args, kwargs, output):
                query, key, value, mask = args[:4]
                probs = module.probe_probabilities(query, key, mask, kwargs.get("attn_mask_type"))
                m = attention_sink_mass(probs)
                m["first_token_mass_per_head"] = first_token_mass_per_head(probs).tolist()
                m["value_norm_ratio"] = first_token_norm_ratio(value, token_dim=0)  # [sk, b, heads, d]
                if self.idle is not None:
                    m["first_token_mass_idle_per_head"] = first_token_mass_per_head(probs, self.idle).tolist()
                self.values[name] = m

            return record

        self.values = {}
        self.handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in self.attentions.items()]
        return self


class TokenProbe(_Hooks):
    """Forward hooks for token-wise outliers: each layer's output (residual stream [s, b, h]): the
    first-token residual-norm ratio, the massive-activation ratio MA and the range inflation RI
    (metrics.outliers), and the first token's norm; where that vector comes from: the first token's
    norm at the embedding output and at each layer's attention and MLP outputs (linear_proj /
    linear_fc2, before their bias); on the last stage, the per-token loss split into the task's
    position classes (``position_masks``: {name: [b, s] bool}, e.g. copy / bigram positions)."""

    def __init__(self, model):
        gpt = unwrap(model)
        self.layers = {f"layer{layer.layer_number - 1}": layer for layer in gpt.decoder.layers}
        self.sources = {f"{name}.attn_out": layer.self_attention.linear_proj for name, layer in self.layers.items()}
        self.sources.update({f"{name}.fc2": layer.mlp.linear_fc2 for name, layer in self.layers.items()})
        if getattr(gpt, "pre_process", False) and getattr(gpt, "embedding", None) is not None:
            self.sources["embedding"] = gpt.embedding
        self.gpt = gpt if getattr(gpt, "post_process", False) else None
        self.position_masks = None
        self.values = {}

    def __enter__(self):
        from megatron_outeff.metrics.outliers import (
            first_token_norm,
            first_token_norm_ratio,
            masked_mean,
            massive_activation_ratio,
            range_inflation,
        )

        def layer_hook(name):
            def record(module, args, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                self.values.setdefault("residual_norm_ratio", {})[name] = first_token_norm_ratio(out, token_dim=0)
                self.values.setdefault("massive_activation", {})[name] = massive_activation_ratio(out, token_dim=0)
                self.values.setdefault("range_inflation", {})[name] = range_inflation(out, token_dim=0)
                self.values.setdefault("first_token_norm", {})[f"{name}.layer"] = first_token_norm(out, token_dim=0)

            return record

        def source_hook(name):
            def record(module, args, output):
                out = output[0] if isinstance(output, (tuple, list)) else output  # [s, b, h]
                self.values.setdefault("first_token_norm", {})[name] = first_token_norm(out, token_dim=0)

            return record

        def loss_hook(module, args, output):
            if self.position_masks is None or not isinstance(output, torch.Tensor) or output.dim() != 2:
                return
            for cls, mask in self.position_masks.items():
                self.values.setdefault("loss", {})[cls] = masked_mean(output, mask.to(output.device))

        self.values = {}
        self.handles = [m.register_forward_hook(layer_hook(n)) for n, m in self.layers.items()]
        self.handles += [m.register_forward_hook(source_hook(n)) for n, m in self.sources.items()]
        if self.gpt is not None:
            self.handles.append(self.gpt.register_forward_hook(loss_hook))
        return self


class OutlierMonitor:
    def __init__(self, model, interval: int):
        from megatron.core import parallel_state as ps

        from megatron_outeff.metrics.outliers import OutlierCollector

        self.interval = interval
        self.measuring = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        # megatron's activations are [s, b, h]: the batch is dim 1
        self.collector = OutlierCollector(megatron_components(model), batch_dim=1)
        self.attention_mass = AttentionMassProbe(core_attentions(model))
        self.tokens = TokenProbe(model)

    def due(self, iteration: int) -> bool:
        return self.interval > 0 and iteration % self.interval == 0

    def measure(self, forward, position_masks: dict | None = None, idle: "torch.Tensor | None" = None) -> dict:
        """Run ``forward()`` (collective: every rank) with the hooks on; returns {tag: value} on the
        logging rank (empty elsewhere). position_masks ({name: [b, s] bool} over the probe batch):
        the loss is also logged per position class (``outliers/loss/{name}``); idle ([b, s] bool):
        the query rows where the task gives a head nothing to do (first-token mass there)."""
        from megatron.core import parallel_state as ps

        from megatron_outeff.metrics.outliers import SINK_THRESHOLD, sink_head_share

        self.collector.reset()
        self.attention_mass.idle = idle
        self.tokens.position_masks = position_masks
        with self.collector, self.attention_mass, self.tokens:
            forward()
        summary = None
        if self.measuring:
            summary = self.collector.summary()
            summary["attention_mass"] = dict(self.attention_mass.values)
            summary["tokens"] = dict(self.tokens.values)
        gathered = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(gathered, summary, group=ps.get_pipeline_model_parallel_group())
        comps, masses, ratios, losses = {}, {}, {}, {}
        massive, inflation, norms = {}, {}, {}
        for s in gathered:
            if s:
                comps.update(s["components"])
                masses.update(s.get("attention_mass", {}))
                ratios.update(s.get("tokens", {}).get("residual_norm_ratio", {}))
                losses.update(s.get("tokens", {}).get("loss", {}))
                massive.update(s.get("tokens", {}).get("massive_activation", {}))
                inflation.update(s.get("tokens", {}).get("range_inflation", {}))
                norms.update(s.get("tokens", {}).get("first_token_norm", {}))
        if not comps:
            return {}
        tags = {}
        for name, c in comps.items():
            path = name.replace(".", "/")
            tags[f"outliers/{path}/inf_norm"] = c["inf_norm"]
            tags[f"outliers/{path}/kurtosis"] = c["kurtosis"]
            tags[f"outliers/{path}/absmax_over_rms"] = c["absmax_over_rms"]

        def agg(fn, key, kind=None):
            xs = [c[key] for c in comps.values() if kind is None or c["kind"] == kind]
            return fn(xs) if xs else math.nan

        tags["outliers/max_inf_norm"] = agg(max, "inf_norm")
        tags["outliers/max_layer_inf_norm"] = agg(max, "inf_norm", "layer")
        tags["outliers/max_ffn_inf_norm"] = agg(max, "inf_norm", "fc2")
        tags["outliers/avg_kurtosis"] = agg(lambda xs: sum(xs) / len(xs), "kurtosis")
        tags["outliers/max_kurtosis"] = agg(max, "kurtosis")
        for layer, m in masses.items():
            tags[f"outliers/{layer}/attn_probs/first_token_mass"] = m["first_token_mass"]
            tags[f"outliers/{layer}/attn_probs/sink_mass"] = m["sink_mass"]
            tags[f"outliers/{layer}/attn_probs/sink_head_share"] = sink_head_share(m["first_token_mass_per_head"])
            tags[f"outliers/{layer}/value_norm_ratio"] = m["value_norm_ratio"]
            if "first_token_mass_idle_per_head" in m:
                per_head = m["first_token_mass_idle_per_head"]
                tags[f"outliers/{layer}/attn_probs/first_token_mass_idle"] = sum(per_head) / len(per_head)
                tags[f"outliers/{layer}/attn_probs/max_head_first_token_mass_idle"] = max(per_head)
        if masses:
            for key in ("first_token_mass", "sink_mass"):
                tags[f"outliers/mean_{key}"] = sum(m[key] for m in masses.values()) / len(masses)
            # Gu et al.'s Sink^0.3 over every head of every (TP rank 0) layer
            tags[f"outliers/sink_head_share_{SINK_THRESHOLD}"] = sink_head_share(
                [x for m in masses.values() for x in m["first_token_mass_per_head"]]
            )
            tags["outliers/min_value_norm_ratio"] = min(m["value_norm_ratio"] for m in masses.values())
            idle = [x for m in masses.values() for x in m.get("first_token_mass_idle_per_head", [])]
            if idle:
                tags["outliers/mean_first_token_mass_idle"] = sum(idle) / len(idle)
                tags["outliers/max_head_first_token_mass_idle"] = max(idle)
        # what a per-tensor quantizer sees (the component with the largest ratio: the largest
        # outliers/<component>/absmax_over_rms tag; evaluation/experiment.py names it)
        tags["outliers/max_absmax_over_rms"] = agg(max, "absmax_over_rms")
        for layer, r in ratios.items():
            tags[f"outliers/{layer}/layer/first_token_norm_ratio"] = r
        if ratios:
            tags["outliers/max_first_token_norm_ratio"] = max(ratios.values())
            tags["outliers/first_token_excess_norm"] = max(ratios.values()) - 1.0  # E
        for layer, v in massive.items():
            tags[f"outliers/{layer}/layer/massive_activation"] = v
        if massive:
            tags["outliers/max_massive_activation"] = max(massive.values())  # MA
        for layer, v in inflation.items():
            tags[f"outliers/{layer}/layer/range_inflation"] = v
        if inflation:
            tags["outliers/max_range_inflation"] = max(inflation.values())  # RI
        for name, v in norms.items():
            tags[f"outliers/{name.replace('.', '/')}/first_token_norm"] = v
        for cls, value in losses.items():
            tags[f"outliers/loss/{cls}"] = value
        return tags
