"""Outlier metrics against numbers computed by hand, and the collector against independent captures."""

import math

import numpy as np
import pytest
import torch

from megatron_outeff.metrics import (
    OutlierCollector,
    attention_sink_mass,
    hf_collector,
    hf_components,
    hf_opt_collector,
    hf_opt_components,
    inf_norm,
    kurtosis,
    kurtosis_per_sample,
    outlier_channels,
    outlier_share,
)


def hand_tensor():
    # sample 0: nine zeros and one 10 (the outlier, in channel 1); sample 1: alternating +1 / -1.
    s0 = [0.0] * 9 + [10.0]
    s1 = [1.0, -1.0] * 5
    return torch.tensor([s0, s1]).reshape(2, 5, 2)


def test_inf_norm_and_kurtosis_by_hand():
    x = hand_tensor()
    # inf norms 10 and 1 -> mean 5.5
    assert inf_norm(x) == pytest.approx(5.5)
    # sample 0: mu = 1; deviations: nine -1, one 9. m4 = (9 + 6561)/10 = 657; unbiased var = 90/9 = 10.
    k0 = 657.0 / (10.0**2 + 1e-6)
    # sample 1: mu = 0; m4 = 1; unbiased var = 10/9.
    k1 = 1.0 / ((10.0 / 9.0) ** 2 + 1e-6)
    assert kurtosis_per_sample(x).tolist() == pytest.approx([k0, k1], rel=1e-12)
    assert kurtosis(x) == pytest.approx((k0 + k1) / 2, rel=1e-12)
    # batch in dim 1 (megatron's [s, b, h]) gives the same
    assert kurtosis(x.transpose(0, 1), batch_dim=1) == pytest.approx((k0 + k1) / 2, rel=1e-12)
    assert inf_norm(x.transpose(0, 1), batch_dim=1) == pytest.approx(5.5)


def test_gaussian_kurtosis_is_pearson():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 200_000, generator=g, dtype=torch.float64)
    assert kurtosis(x) == pytest.approx(3.0, abs=0.05)  # Pearson (not excess): 3 for a Gaussian


def test_outlier_share_and_channels_by_hand():
    x = hand_tensor()
    # sample 0: |9| > 2 * sqrt(10) = 6.32 for one value of ten; sample 1: nothing beyond 2 sigma.
    assert outlier_share(x, n_sigma=2.0) == pytest.approx(0.05)
    assert outlier_share(x) == 0.0  # nothing beyond 6 sigma with 10 values per sample
    idx, vals = outlier_channels(x, k=2)
    assert idx == [1, 0] and vals == pytest.approx([10.0, 1.0])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="batch_dim"):
        inf_norm(torch.zeros(2, 3), batch_dim=2)
    with pytest.raises(ValueError, match="at least 2"):
        kurtosis(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="k must"):
        outlier_channels(torch.zeros(2, 3), k=0)
    with pytest.raises(ValueError, match="kind"):
        OutlierCollector({"layer0.bogus": torch.nn.Identity()})


def test_attention_sink_mass_by_hand():
    probs = torch.tensor([[[[0.5, 0.2, 0.1], [0.25, 0.25, 0.25]]]])  # rows sum to 0.8 and 0.75
    out = attention_sink_mass(probs)
    assert out["first_token_mass"] == pytest.approx((0.5 + 0.25) / 2)
    assert out["sink_mass"] == pytest.approx((0.2 + 0.25) / 2)
    # Softmax_1 rows of two zero logits: p = 1/3 each, L = log 3, sink = exp(0 - log 3) = 1/3.
    p = torch.full((1, 1, 1, 2), 1.0 / 3.0)
    out = attention_sink_mass(p, sink_logits=torch.zeros(1), lse=torch.full((1, 1, 1), math.log(3.0)))
    assert out["sink_mass"] == pytest.approx(1.0 / 3.0)
    with pytest.raises(ValueError, match="go together"):
        attention_sink_mass(p, sink_logits=torch.zeros(1))


def np_kurtosis(rows):
    rows = np.asarray(rows, dtype=np.float64)
    mu = rows.mean(axis=1, keepdims=True)
    return ((rows - mu) ** 4).mean(axis=1) / (rows.std(axis=1, ddof=1) ** 4 + 1e-6)


def test_collector_matches_independent_capture(tiny_opt):
    model = tiny_opt
    comps = hf_components(model)
    collector = hf_collector(model)
    batches = [torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    # Independent capture: hidden states for layer outputs, raw hooks of our own for fc2 / out_proj.
    raw = {n: [] for n in comps if n.endswith((".fc2", ".attn_out"))}
    handles = [comps[n].register_forward_hook(lambda m, a, o, n=n: raw[n].append(o.detach())) for n in raw]
    # Disabled: none of our hooks (transformers may hold hooks of its own on layers).
    baseline = {n: len(m._forward_hooks) for n, m in comps.items()}
    assert not collector.enabled
    hidden = []
    with torch.no_grad(), collector:
        assert {n: len(m._forward_hooks) - baseline[n] for n, m in comps.items()} == {n: 1 for n in comps}
        ours = {h.id for h in collector._handles}
        for ids in batches:
            hidden.append(model(ids, output_hidden_states=True).hidden_states)
    assert not collector.enabled
    assert not any(ours & set(m._forward_hooks) for m in comps.values())
    for h in handles:
        h.remove()

    summ = collector.summary()
    dec = model.model.decoder
    n_layers = len(dec.layers)
    expected = {}
    for i in range(n_layers):
        # hidden_states[i + 1] is layer i's output, except the last entry which HF stores after the
        # final LayerNorm (checked below through final_ln).
        layer_in = torch.cat([h[i] for h in hidden])
        with torch.no_grad():
            expected[f"layer{i}.attn_ln"] = dec.layers[i].self_attn_layer_norm(layer_in)
        if i + 1 < n_layers:
            expected[f"layer{i}.layer"] = torch.cat([h[i + 1] for h in hidden])
    for n, outs in raw.items():
        expected[n] = torch.cat(outs)
    expected["final_ln"] = torch.cat([h[-1] for h in hidden])
    for name, x in expected.items():
        rows = x.reshape(4, -1).double().numpy()  # 4 samples; HF OPT flattens FFN outputs to [b*s, d]
        assert summ["components"][name]["inf_norm"] == pytest.approx(np.abs(rows).max(axis=1).mean(), rel=1e-6), name
        assert summ["components"][name]["kurtosis"] == pytest.approx(np_kurtosis(rows).mean(), rel=1e-6), name
        assert summ["components"][name]["samples"] == 4

    c = summ["components"]
    assert summ["max_layer_inf_norm"] == max(v["inf_norm"] for k, v in c.items() if k.endswith(".layer"))
    assert summ["max_ffn_inf_norm"] == max(v["inf_norm"] for k, v in c.items() if k.endswith(".fc2"))
    assert summ["max_inf_norm"] == max(v["inf_norm"] for v in c.values())
    assert summ["avg_kurtosis"] == pytest.approx(np.mean([v["kurtosis"] for v in c.values()]))
    assert summ["max_kurtosis"] == max(v["kurtosis"] for v in c.values())
    assert len(c) == 5 * n_layers + 1


def test_collector_detail_outlier_share_and_channels_over_batches():
    # detail=True: outlier share is the sample average of outlier_share_per_sample over all batches,
    # and the top channels come from the per-channel max |x| over all batches.
    from megatron_outeff.metrics import outlier_share_per_sample

    lin = torch.nn.Identity()
    collector = OutlierCollector({"layer0.layer": lin}, detail=True, n_sigma=3.0, top_k=2)
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 50, 16, generator=g), torch.randn(3, 50, 16, generator=g)
    x1[0, 3, 5] = 40.0
    x2[2, 7, 11] = -90.0
    with collector:
        lin(x1)
        lin(x2)
    c = collector.summary()["components"]["layer0.layer"]
    expected = torch.cat([outlier_share_per_sample(x1, 3.0), outlier_share_per_sample(x2, 3.0)]).mean().item()
    assert c["outlier_share"] == pytest.approx(expected, rel=1e-12) and c["outlier_share"] > 0
    assert c["top_channels"] == [11, 5] and c["top_channel_values"] == pytest.approx([90.0, 40.0])
    plain = OutlierCollector({"layer0.layer": lin})
    with plain:
        lin(x1)
    assert "outlier_share" not in plain.summary()["components"]["layer0.layer"]  # detail is opt-in


def test_hf_components_names_what_it_expected():
    """The OPT-only names are the any-family functions; a module that is no Hugging Face model is one line."""
    from megatron_outeff.errors import OutEffError

    assert (hf_opt_components, hf_opt_collector) == (hf_components, hf_collector)
    with pytest.raises(OutEffError, match=r"^Linear: expected a Hugging Face causal LM or base model"):
        hf_components(torch.nn.Linear(2, 2))
