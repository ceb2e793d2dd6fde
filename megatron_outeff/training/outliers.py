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

Notes: megatron's linear_proj / linear_fc2 return their output without the bias (added in the
fused bias-dropout-add), so attn_out / fc2 are measured before the bias. Under sequence parallelism
a TP rank holds a sequence slice, so the statistics are those of TP rank 0's slice.
"""
from __future__ import annotations

import math

import torch.distributed as dist

from .model import unwrap


def megatron_components(model) -> dict:
    """{'layer{i}.{kind}': module} for this stage's layers (i = global layer index) + 'final_ln'."""
    gpt = unwrap(model)
    comps = {}
    for layer in gpt.decoder.layers:
        i = layer.layer_number - 1
        comps[f"layer{i}.attn_ln"] = layer.input_layernorm
        comps[f"layer{i}.attn_out"] = layer.self_attention.linear_proj
        comps[f"layer{i}.ffn_ln"] = layer.pre_mlp_layernorm
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
    return {f"layer{layer.layer_number - 1}": layer.self_attention.core_attention for layer in gpt.decoder.layers
            if hasattr(layer.self_attention.core_attention, "probe_probabilities")}


class AttentionMassProbe:
    """Forward hooks that record each core attention's mean first-key and sink mass while active."""

    def __init__(self, attentions: dict):
        self.attentions = attentions
        self.values = {}

    def __enter__(self):
        from megatron_outeff.metrics.outliers import attention_sink_mass

        def hook(name):
            def record(module, args, kwargs, output):
                query, key, _, mask = args[:4]
                probs = module.probe_probabilities(query, key, mask, kwargs.get("attn_mask_type"))
                self.values[name] = attention_sink_mass(probs)
            return record

        self.values = {}
        self.handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in self.attentions.items()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []


class OutlierMonitor:
    def __init__(self, model, interval: int):
        from megatron.core import parallel_state as ps
        from megatron_outeff.metrics.outliers import OutlierCollector

        self.interval = interval
        self.measuring = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        # megatron's activations are [s, b, h]: the batch is dim 1
        self.collector = OutlierCollector(megatron_components(model), batch_dim=1)
        self.attention_mass = AttentionMassProbe(core_attentions(model))

    def due(self, iteration: int) -> bool:
        return self.interval > 0 and iteration % self.interval == 0

    def measure(self, forward) -> dict:
        """Run ``forward()`` (collective: every rank) with the hooks on; returns {tag: value} on the
        logging rank (empty elsewhere)."""
        from megatron.core import parallel_state as ps

        self.collector.reset()
        with self.collector, self.attention_mass:
            forward()
        summary = None
        if self.measuring:
            summary = self.collector.summary()
            summary["attention_mass"] = dict(self.attention_mass.values)
        gathered = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(gathered, summary, group=ps.get_pipeline_model_parallel_group())
        comps, masses = {}, {}
        for s in gathered:
            if s:
                comps.update(s["components"])
                masses.update(s.get("attention_mass", {}))
        if not comps:
            return {}
        tags = {}
        for name, c in comps.items():
            path = name.replace(".", "/")
            tags[f"outliers/{path}/inf_norm"] = c["inf_norm"]
            tags[f"outliers/{path}/kurtosis"] = c["kurtosis"]

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
        if masses:
            for key in ("first_token_mass", "sink_mass"):
                tags[f"outliers/mean_{key}"] = sum(m[key] for m in masses.values()) / len(masses)
        return tags
