"""Outlier metrics during training (the paper's inf norm / kurtosis; megatron_outeff.metrics).

Every ``logging.outlier_interval`` steps, one fixed validation micro-batch is run forward (eval mode,
no grad) with forward hooks on each local layer's attention LayerNorm, attention output projection,
pre-FFN LayerNorm, fc2, the layer output (residual stream) and the final LayerNorm. Each pipeline
stage measures its own layers (on TP rank 0 / DP rank 0); the summaries meet on the logging rank,
which writes ``outliers/layer{i}/{kind}/{inf_norm,kurtosis}`` and the paper's aggregates
``outliers/max_layer_inf_norm`` etc. Disabled (interval 0) nothing is built and no hook exists.

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


class OutlierMonitor:
    def __init__(self, model, interval: int):
        from megatron.core import parallel_state as ps
        from megatron_outeff.metrics.outliers import OutlierCollector

        self.interval = interval
        self.measuring = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        # megatron's activations are [s, b, h]: the batch is dim 1
        self.collector = OutlierCollector(megatron_components(model), batch_dim=1)

    def due(self, iteration: int) -> bool:
        return self.interval > 0 and iteration % self.interval == 0

    def measure(self, forward) -> dict:
        """Run ``forward()`` (collective: every rank) with the hooks on; returns {tag: value} on the
        logging rank (empty elsewhere)."""
        from megatron.core import parallel_state as ps

        self.collector.reset()
        with self.collector:
            forward()
        summary = self.collector.summary() if self.measuring else None
        gathered = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(gathered, summary, group=ps.get_pipeline_model_parallel_group())
        comps = {}
        for s in gathered:
            if s:
                comps.update(s["components"])
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
        return tags
