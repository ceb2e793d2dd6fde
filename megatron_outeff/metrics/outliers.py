"""Outlier metrics with the paper's exact definitions, and a hook-based collector.

Every metric sees an activation tensor as one row per sample: the tensor is moved so that the batch
dimension comes first and reshaped to (batch, tokens*dim), as the authors' scripts do. Each statistic
is computed per sample (per row) and only then averaged over samples:

    inf norm   ||x_b||_inf = max_i |x_b,i|                                   (per sample b)
    kurtosis   k_b = mean_i (x_b,i - mu_b)^4 / (sigma_b^4 + 1e-6)            (Pearson, not excess:
               mu_b the row mean, sigma_b the row's unbiased standard deviation; a Gaussian gives 3)

The collector keeps the per-sample values of every batch, so a component's inf norm / kurtosis is the
mean over all samples seen, exactly as if all batches had been concatenated.

Knows nothing of Megatron or DeepSpeed: it works on any nn.Module; callers name the components.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "KURTOSIS_EPS",
    "COMPONENT_KINDS",
    "per_sample_rows",
    "inf_norm_per_sample",
    "inf_norm",
    "kurtosis_per_sample",
    "kurtosis",
    "outlier_share_per_sample",
    "outlier_share",
    "channel_absmax",
    "outlier_channels",
    "attention_sink_mass",
    "first_token_mass_per_head",
    "sink_head_share",
    "SINK_THRESHOLD",
    "first_token_norm_ratio",
    "massive_activation_ratio",
    "range_inflation",
    "first_token_norm",
    "absmax_over_rms",
    "masked_mean",
    "OutlierCollector",
    "hf_opt_components",
    "hf_opt_collector",
    "hf_collector",
    "hf_components",
    "hf_decoder_layers",
    "hf_embedding_modules",
]

# The 1e-6 added to sigma^4 in the denominator of the paper's kurtosis.
KURTOSIS_EPS = 1e-6

# Component kinds understood by the collector's aggregates (field notes section 2: the hooked places).
#   attn_ln   LayerNorm before attention          attn_out  attention output projection
#   ffn_ln    LayerNorm before the FFN            fc2       FFN output (second linear)
#   layer     a whole layer's output = the residual stream after the layer
#   final_ln  the final LayerNorm of the decoder
# Post-LayerNorm models (OPT-350m): attn_ln / ffn_ln are the same LayerNorm modules (HF
# self_attn_layer_norm / final_layer_norm), applied after the attention / FFN residual add; no final_ln.
COMPONENT_KINDS = ("attn_ln", "attn_out", "ffn_ln", "fc2", "layer", "final_ln")


def per_sample_rows(x: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """x moved so that `batch_dim` is first and flattened to (batch, rest), in float64.

    float64 because the fourth moment of fp16/fp32 activations with outliers in the hundreds loses
    precision in float32 (sums of ~1e8-sized terms over ~4e5 values)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or not -x.dim() <= batch_dim < x.dim():
        raise ValueError(f"batch_dim={batch_dim} is out of range for a tensor of shape {tuple(x.shape)}")
    x = x.detach().movedim(batch_dim, 0)
    return x.reshape(x.shape[0], -1).to(torch.float64)


def inf_norm_per_sample(x: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """max_i |x_b,i| for every sample b; shape (batch,), float64."""
    return per_sample_rows(x, batch_dim).abs().amax(dim=1)


def inf_norm(x: torch.Tensor, batch_dim: int = 0) -> float:
    """The paper's inf norm: per-sample max |x|, averaged over samples."""
    return inf_norm_per_sample(x, batch_dim).mean().item()


def kurtosis_per_sample(x: torch.Tensor, batch_dim: int = 0) -> torch.Tensor:
    """Pearson kurtosis per sample: mean((x - mu)^4) / (std_unbiased^4 + 1e-6); shape (batch,)."""
    rows = per_sample_rows(x, batch_dim)
    if rows.shape[1] < 2:
        raise ValueError(f"kurtosis needs at least 2 values per sample, got {rows.shape[1]}")
    centred = rows - rows.mean(dim=1, keepdim=True)
    fourth_moment = centred.pow(4).mean(dim=1)
    std = rows.std(dim=1, correction=1)
    return fourth_moment / (std.pow(4) + KURTOSIS_EPS)


def kurtosis(x: torch.Tensor, batch_dim: int = 0) -> float:
    """The paper's kurtosis: per-sample Pearson kurtosis, averaged over samples."""
    return kurtosis_per_sample(x, batch_dim).mean().item()


def outlier_share_per_sample(x: torch.Tensor, n_sigma: float = 6.0, batch_dim: int = 0) -> torch.Tensor:
    """Per sample b: fraction of i with |x_b,i - mu_b| > n_sigma * sigma_b (unbiased sigma); (batch,)."""
    if not n_sigma > 0:
        raise ValueError(f"n_sigma must be > 0, got {n_sigma}")
    rows = per_sample_rows(x, batch_dim)
    mu = rows.mean(dim=1, keepdim=True)
    sigma = rows.std(dim=1, correction=1, keepdim=True)
    return ((rows - mu).abs() > n_sigma * sigma).to(torch.float64).mean(dim=1)


def outlier_share(x: torch.Tensor, n_sigma: float = 6.0, batch_dim: int = 0) -> float:
    """Share of values farther than n_sigma standard deviations from their sample's mean.

    Per sample b: fraction of i with |x_b,i - mu_b| > n_sigma * sigma_b (unbiased sigma), averaged over
    samples like the other metrics. For a Gaussian, 6 sigma is ~2e-9: anything visible is an outlier."""
    return outlier_share_per_sample(x, n_sigma, batch_dim).mean().item()


def channel_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| per hidden channel (the LAST dim) over all other dims; shape (channels,), x's dtype."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"expected a tensor with a hidden (last) dimension, got {type(x).__name__}")
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0)


def outlier_channels(x: torch.Tensor, k: int = 8) -> tuple[list[int], list[float]]:
    """The hidden dimensions carrying the outliers: the k channels (indices along the LAST dim) with
    the largest max |x| over all other dims, with those max values, largest first.
    `x` may also be a ready (channels,) vector of per-channel max |x| (what channel_absmax returns)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    per_channel = channel_absmax(x)
    values, indices = per_channel.topk(min(k, per_channel.numel()))
    return indices.tolist(), values.tolist()


def attention_sink_mass(
    probs: torch.Tensor, sink_logits: torch.Tensor | None = None, lse: torch.Tensor | None = None
) -> dict[str, float]:
    """Mean attention mass on the first key and on the sink, over all rows (batch, head, query).

    probs: [b, h, sq, sk] attention probabilities over the real keys (Softmax_1 / softmax_n /
    learnable-offset rows sum to less than 1; vanilla rows sum to 1).
    Sink mass of a row = 1 - sum_j p_j: the share the implicit extra key (logit a_h, value 0) takes.
    If the per-head sink logits a_h ([h]) and the rows' log-normalisers L ([b, h, sq], sink included,
    as the flash form stores them) are both given, the sink mass is computed directly as
    exp(a_h - L), which stays accurate when it is tiny (1 - sum loses it in rounding).
    """
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4:
        shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
        raise ValueError(f"probs must be a [b, h, sq, sk] tensor, got {shape}")
    if (sink_logits is None) != (lse is None):
        raise ValueError("sink_logits and lse go together: give both (exact sink mass) or neither (1 - row sum)")
    p = probs.detach().to(torch.float64)
    first = p[..., 0].mean().item()
    if sink_logits is None:
        sink = (1.0 - p.sum(dim=-1)).mean().item()
    else:
        b, h, sq, _ = p.shape
        if sink_logits.numel() != h or tuple(lse.shape) != (b, h, sq):
            raise ValueError(
                f"sink_logits must have {h} values and lse shape {(b, h, sq)}, "
                f"got {tuple(sink_logits.shape)} and {tuple(lse.shape)}"
            )
        a = sink_logits.detach().to(torch.float64).reshape(1, h, 1)
        sink = torch.exp(a - lse.detach().to(torch.float64)).mean().item()
    return {"first_token_mass": first, "sink_mass": sink}


# Gu et al. (arXiv 2410.10781) call a head a sink head when its mean attention on the first token
# exceeds epsilon; Sink^epsilon is the share of such heads. Their headline epsilon is 0.3.
SINK_THRESHOLD = 0.3


def first_token_mass_per_head(probs: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean attention probability on the first key, per head, over the selected query rows.

    probs: [b, h, sq, sk] attention probabilities. query_mask: [b, sq] bool, True = include that
    query row (e.g. the positions where a head has nothing to do); None = every row (Gu et al.'s
    alpha_h = 1/T sum_t A_h[t, 0], averaged over the batch too). Returns [h] float64; NaN for
    every head if no row is selected."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 4:
        raise ValueError(f"probs must be a [b, h, sq, sk] tensor, got {getattr(probs, 'shape', type(probs).__name__)}")
    first = probs.detach().to(torch.float64)[..., 0]  # [b, h, sq]
    if query_mask is None:
        return first.mean(dim=(0, 2))
    b, _, sq = first.shape
    if tuple(query_mask.shape) != (b, sq):
        raise ValueError(f"query_mask must have shape {(b, sq)}, got {tuple(query_mask.shape)}")
    w = query_mask.to(device=first.device, dtype=torch.float64).unsqueeze(1)  # [b, 1, sq]
    return (first * w).sum(dim=(0, 2)) / w.sum()


def sink_head_share(first_token_mass: torch.Tensor, threshold: float = SINK_THRESHOLD) -> float:
    """Share of heads whose mean first-token mass exceeds ``threshold`` (Gu et al.'s Sink^epsilon).
    first_token_mass: per-head masses (any shape, e.g. [layers, h] or [h])."""
    m = torch.as_tensor(first_token_mass, dtype=torch.float64).reshape(-1)
    if m.numel() == 0:
        raise ValueError("first_token_mass is empty: expected one value per head")
    return (m > threshold).to(torch.float64).mean().item()


def first_token_norm_ratio(x: torch.Tensor, token_dim: int = 0) -> float:
    """Norm of the first token's vector over the median norm across all positions, averaged.

    x: activations with the token axis at ``token_dim`` and the feature axis LAST, e.g. a residual
    stream [s, b, d] (megatron, token_dim 0) or [b, s, d] (token_dim 1), or value vectors
    [s, b, h, d_head] (one ratio per sample and head). For every other index (sample, head):
    ||x[0]||_2 / median_t ||x[t]||_2 (median over all s positions, the first included; the mean of
    the two middle values for even s), then the mean over those indices. A massive-activation sink
    token gives >> 1; a sink with a small value vector gives << 1. float64."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(
            f"x must be a tensor with a token axis and a feature (last) axis, got {getattr(x, 'shape', x)}"
        )
    if not -x.dim() <= token_dim < x.dim() or token_dim % x.dim() == x.dim() - 1:
        raise ValueError(f"token_dim={token_dim} must not be the feature (last) axis of shape {tuple(x.shape)}")
    norms = x.detach().to(torch.float64).norm(dim=-1).movedim(token_dim, 0)  # [s, ...]
    median = torch.quantile(norms.reshape(norms.shape[0], -1), 0.5, dim=0).reshape(norms.shape[1:])
    return (norms[0] / median).mean().item()


def _token_first(x: torch.Tensor, token_dim: int, what: str) -> torch.Tensor:
    """|x| in float64 as [s, samples, d]: the token axis first, the feature (last) axis last, every
    other axis (batch, heads) one sample axis."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(
            f"{what}: x must be a tensor with a token axis and a feature (last) axis, got {getattr(x, 'shape', x)}"
        )
    if not -x.dim() <= token_dim < x.dim() or token_dim % x.dim() == x.dim() - 1:
        raise ValueError(f"{what}: token_dim={token_dim} must not be the feature (last) axis of shape {tuple(x.shape)}")
    a = x.detach().to(torch.float64).abs().movedim(token_dim, 0)
    if a.shape[0] < 2:
        raise ValueError(f"{what}: needs at least 2 tokens, got shape {tuple(x.shape)}")
    return a.reshape(a.shape[0], -1, a.shape[-1])


def massive_activation_ratio(x: torch.Tensor, token_dim: int = 0) -> float:
    """MA: how far the first token's largest channel stands above a typical activation, as a per-tensor
    quantizer's range sees it: max_c |x_0,c| / median_{t,c} |x_t,c| (median over every position, the
    first included, and channel), per sample (every index of the axes other than token and feature),
    then the mean over samples. 1-ish without a massive activation; float64. x: e.g. a residual stream
    [s, b, d] (token_dim 0) or [b, s, d] (token_dim 1). (Sun et al. 2024 "Massive activations" compare
    a token's top magnitude with the median magnitude; here the token is the first.)"""
    a = _token_first(x, token_dim, "massive_activation_ratio")  # [s, n, d]
    top0 = a[0].amax(dim=-1)  # [n]
    median = torch.quantile(a.permute(1, 0, 2).reshape(a.shape[1], -1), 0.5, dim=1)
    return (top0 / median).mean().item()


def range_inflation(x: torch.Tensor, token_dim: int = 0) -> float:
    """RI: does the first token set the quantization range? max_c |x_0,c| / max_{t>=1,c} |x_t,c| per
    sample, then the mean over samples (<= 1: another token sets the range; >> 1: the first token
    alone stretches it). float64; same layouts as ``massive_activation_ratio``."""
    a = _token_first(x, token_dim, "range_inflation")
    return (a[0].amax(dim=-1) / a[1:].amax(dim=(0, 2))).mean().item()


def first_token_norm(x: torch.Tensor, token_dim: int = 0) -> float:
    """||x_0||_2, the first token's vector norm, averaged over samples (where its vector comes from:
    the embedding and each layer's attention / MLP output at position 0). float64."""
    a = _token_first(x, token_dim, "first_token_norm")
    return a[0].pow(2).sum(dim=-1).sqrt().mean().item()


def absmax_over_rms(x: torch.Tensor) -> float:
    """max|x| / sqrt(mean(x^2)) over the WHOLE tensor (what one per-tensor quantization range has to
    cover, in units of the tensor's typical size: a Gaussian tensor of n values gives ~sqrt(2 ln n));
    0 for an all-zero tensor. float64."""
    if not isinstance(x, torch.Tensor) or x.numel() == 0:
        raise ValueError(f"absmax_over_rms: expected a non-empty tensor, got {getattr(x, 'shape', type(x).__name__)}")
    a = x.detach().to(torch.float64)
    rms = a.pow(2).mean().sqrt().item()
    return a.abs().max().item() / rms if rms > 0 else 0.0


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` where ``mask`` is true (same shape); NaN when nothing is selected. float64."""
    if values.shape != mask.shape:
        raise ValueError(f"values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape")
    m = mask.to(device=values.device, dtype=torch.bool)
    n = int(m.sum())
    return values.detach().to(torch.float64)[m].sum().item() / n if n else math.nan


class OutlierCollector:
    """Forward hooks that gather the paper's per-component outlier statistics over several batches.

    components: {name: submodule}; each name's kind (one of COMPONENT_KINDS) is `kinds[name]` if given,
    else the text after the name's last '.' (so "layer3.fc2" is an fc2 output). The caller builds the
    mapping for its model (see hf_components for Hugging Face models).
    batch_dim: where the batch sits in the hooked outputs (0 for HF, 1 for megatron's [s, b, h]).
    root: optional model whose forward input tells the batch size. Some models flatten (batch, tokens)
    into one dim inside a layer (HF OPT runs its FFN on [b*s, d]); with the batch size known, such a
    2-D output is reshaped back to (batch, tokens*dim) so its rows are still samples, as the paper's
    definition requires. Without root, every output must carry the batch along batch_dim.

    detail: also record, per component, the share of values beyond `n_sigma` standard deviations
    (outlier_share, sample-averaged) and the running per-channel max |x| (the hidden dimensions that
    carry the outliers; summary() gives the `top_k` of them). Off by default (extra cost per hook).

    Disabled, it registers no hooks at all (zero overhead). Use enable()/disable() or `with collector:`.
    Per component also ``absmax_over_rms`` of the whole tensor (all batches), as one per-tensor
    quantization range sees it. Aggregates in summary():
        max_absmax_over_rms (+ _component: its name)  the largest over all components
        max_inf_norm        max over all components
        max_layer_inf_norm  max over 'layer' components (residual stream; the paper's OPT number)
        max_ffn_inf_norm    max over 'fc2' components
        avg_kurtosis        mean over all components of their (sample-averaged) kurtosis
        max_kurtosis        max over all components
    """

    def __init__(
        self,
        components: Mapping[str, nn.Module],
        kinds: Mapping[str, str] | None = None,
        batch_dim: int = 0,
        root: nn.Module | None = None,
        detail: bool = False,
        n_sigma: float = 6.0,
        top_k: int = 8,
    ):
        if not components:
            raise ValueError("components is empty: expected {name: submodule}")
        kinds = dict(kinds or {})
        self._kinds: dict[str, str] = {}
        for name, module in components.items():
            if not isinstance(module, nn.Module):
                raise ValueError(f"component {name!r} is a {type(module).__name__}, expected an nn.Module")
            kind = kinds.get(name, name.rsplit(".", 1)[-1])
            if kind not in COMPONENT_KINDS:
                raise ValueError(f"component {name!r} has kind {kind!r}; expected one of {COMPONENT_KINDS}")
            self._kinds[name] = kind
        self._components = dict(components)
        self.batch_dim = batch_dim
        self._root = root
        self.detail, self.n_sigma, self.top_k = bool(detail), float(n_sigma), int(top_k)
        if not self.n_sigma > 0 or self.top_k < 1:
            raise ValueError(f"n_sigma must be > 0 and top_k >= 1, got {n_sigma}, {top_k}")
        self._batch_size: int | None = None
        self._handles: list = []
        self.reset()

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self._handles)

    def enable(self) -> "OutlierCollector":
        if not self._handles:
            if self._root is not None:
                self._handles.append(self._root.register_forward_pre_hook(self._record_batch, with_kwargs=True))
            for name, module in self._components.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        return self

    def disable(self) -> "OutlierCollector":
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self

    def __enter__(self) -> "OutlierCollector":
        return self.enable()

    def __exit__(self, *exc) -> None:
        self.disable()

    def reset(self) -> None:
        self._inf: dict[str, list[torch.Tensor]] = {n: [] for n in self._components}
        self._kurt: dict[str, list[torch.Tensor]] = {n: [] for n in self._components}
        self._share: dict[str, list[torch.Tensor]] = {n: [] for n in self._components}
        self._chan: dict[str, torch.Tensor | None] = {n: None for n in self._components}
        # whole-tensor max|x|, sum x^2 and count over every batch: absmax_over_rms of the concatenation
        self._absrms: dict[str, list[float]] = {n: [0.0, 0.0, 0] for n in self._components}

    def _record_batch(self, module, args, kwargs):
        # The batch size is the batch_dim size of the root's first tensor input (input_ids, embeds...).
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self._batch_size = None if first is None else first.shape[self.batch_dim]

    def _make_hook(self, name: str):
        def hook(module, args, output):
            # Decoder layers may return a tuple (hidden_states, ...): the first item is the output.
            out = output[0] if isinstance(output, (tuple, list)) else output
            b = self._batch_size
            if b is not None and out.dim() == 2 and out.shape[self.batch_dim] != b:
                # [b*s, d] -> (b, s*d); with batch_dim 1 the flattened order is s-major ([s*b, d]).
                if out.shape[0] % b != 0:
                    raise ValueError(f"component {name!r}: output rows {out.shape[0]} are not a multiple of batch {b}")
                out = out.reshape(b, -1, out.shape[-1]) if self.batch_dim == 0 else out.reshape(-1, b, out.shape[-1])
            self._inf[name].append(inf_norm_per_sample(out, self.batch_dim).cpu())
            self._kurt[name].append(kurtosis_per_sample(out, self.batch_dim).cpu())
            acc, flat = self._absrms[name], out.detach().to(torch.float64)
            acc[0] = max(acc[0], flat.abs().max().item())
            acc[1] += flat.pow(2).sum().item()
            acc[2] += flat.numel()
            if self.detail:
                self._share[name].append(outlier_share_per_sample(out, self.n_sigma, self.batch_dim).cpu())
                ch = channel_absmax(out).to(torch.float64).cpu()
                prev = self._chan[name]
                self._chan[name] = ch if prev is None else torch.maximum(prev, ch)

        return hook

    # -- results -----------------------------------------------------------------------------------
    def per_sample(self, name: str) -> dict[str, torch.Tensor]:
        """All per-sample values gathered for one component: {'inf_norm': (n,), 'kurtosis': (n,)}."""
        if name not in self._components:
            raise ValueError(f"unknown component {name!r}; known: {sorted(self._components)}")
        cat = lambda xs: torch.cat(xs) if xs else torch.empty(0, dtype=torch.float64)  # noqa: E731
        return {"inf_norm": cat(self._inf[name]), "kurtosis": cat(self._kurt[name])}

    def summary(self) -> dict:
        """{'components': {name: {'kind', 'inf_norm', 'kurtosis', 'samples'}}, plus the aggregates}."""
        comps = {}
        for name in self._components:
            vals = self.per_sample(name)
            if vals["inf_norm"].numel() == 0:
                continue
            amax, sq, count = self._absrms[name]
            comps[name] = {
                "kind": self._kinds[name],
                "inf_norm": vals["inf_norm"].mean().item(),
                "kurtosis": vals["kurtosis"].mean().item(),
                "samples": vals["inf_norm"].numel(),
                "absmax_over_rms": amax / math.sqrt(sq / count) if sq > 0 else 0.0,
            }
            if self.detail:
                idx, top = outlier_channels(self._chan[name], self.top_k)
                comps[name]["outlier_share"] = torch.cat(self._share[name]).mean().item()
                comps[name]["top_channels"] = idx
                comps[name]["top_channel_values"] = top
        if not comps:
            raise ValueError("no activations collected: enable() the collector and run the model first")

        def agg(fn, key, kind=None):
            xs = [c[key] for c in comps.values() if kind is None or c["kind"] == kind]
            return fn(xs) if xs else math.nan

        worst = max(comps, key=lambda n: comps[n]["absmax_over_rms"])
        return {
            "components": comps,
            "max_absmax_over_rms": comps[worst]["absmax_over_rms"],
            "max_absmax_over_rms_component": worst,
            "max_inf_norm": agg(max, "inf_norm"),
            "max_layer_inf_norm": agg(max, "inf_norm", "layer"),
            "max_ffn_inf_norm": agg(max, "inf_norm", "fc2"),
            "avg_kurtosis": agg(lambda xs: sum(xs) / len(xs), "kurtosis"),
            "max_kurtosis": agg(max, "kurtosis"),
        }


def hf_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a Hugging Face causal LM (or its base model) of any model family
    (megatron_outeff/models/family.py: ``model.decoder.layers`` for OPT, ``model.layers`` for Llama)."""
    return _hf_module(model, _family_components(model).layers)


def hf_components(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} for a Hugging Face causal LM of any model family (or its base model), names
    'layer{i}.{kind}' + 'final_ln': per layer the norm before attention (attn_ln; after it in post-LN OPT-350m),
    the attention output projection (attn_out), the norm before the FFN (ffn_ln), the FFN output projection
    (fc2) and the layer itself (its output is the residual stream); the decoder's final norm (none in OPT-350m).
    The family's module names: models/family.py ``HFComponents`` (OPT: self_attn_layer_norm, self_attn.out_proj,
    final_layer_norm, fc2, model.decoder.final_layer_norm; Llama: input_layernorm, self_attn.o_proj,
    post_attention_layernorm, mlp.down_proj, model.norm). OutEffError for a model of no known family."""
    names = _family_components(model)
    comps: dict[str, nn.Module] = {}
    for i, layer in enumerate(_hf_module(model, names.layers)):
        for kind in ("attn_ln", "attn_out", "ffn_ln", "fc2"):
            comps[f"layer{i}.{kind}"] = layer.get_submodule(getattr(names, kind))
        comps[f"layer{i}.layer"] = layer
    final = _hf_module(model, names.final_ln, required=False)
    if final is not None:  # post-LN OPT (350m) has none
        comps["final_ln"] = final
    return comps


def hf_embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the embeddings whose outputs sum to the first layer's input (OPT: embed_tokens,
    embed_positions; Llama: embed_tokens; models/family.py ``HFComponents.embeddings``)."""
    return {name: _hf_module(model, path) for name, path in _family_components(model).embeddings}


def hf_collector(model: nn.Module, **kwargs) -> OutlierCollector:
    """An OutlierCollector over hf_components(model), with the model as root (Hugging Face's OPT flattens the
    FFN input to [b*s, d], so the collector needs the batch size to keep rows per sample).
    kwargs (detail, n_sigma, top_k) go to OutlierCollector."""
    return OutlierCollector(hf_components(model), root=model, **kwargs)


# The names of the OPT-only releases: the same functions (any family).
hf_opt_components = hf_components
hf_opt_collector = hf_collector


def _family_components(model: nn.Module):
    from megatron_outeff.errors import OutEffError
    from megatron_outeff.models.family import family_for_hf_model_type

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise OutEffError(
            f"{type(model).__name__}: expected a Hugging Face causal LM or base model (with .config.model_type)"
        )
    return family_for_hf_model_type(model_type).hf_components


def _hf_module(model: nn.Module, path: str, required: bool = True):
    """The submodule at ``path`` (from the CausalLM root; a base model lacks the leading 'model.')."""
    for p in (path, path[len("model.") :] if path.startswith("model.") else None):
        if p is None:
            continue
        try:
            return model.get_submodule(p)
        except AttributeError:
            pass
    if required:
        raise ValueError(f"{type(model).__name__} has no module {path!r}")
    return None
