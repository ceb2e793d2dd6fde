"""Single-process checks of the megatron-core integration (one process group, TP=1).

* our softmax1 / learnable / vanilla(GQA, layer scaling, masks) layers vs megatron-core's own
  softmax_type='off-by-one' / 'learnable' / 'vanilla' GPTModel with the same weights, and our elementwise
  gate vs megatron-core's own gated attention (attention_output_gate=True), with each softmax and GQA;
* the gate equals a hand computation, and opens at gate_init_prob;
* bad inputs fail with one-line errors.
"""

import math

import pytest
import torch
from megatron_testlib import SEQ, VOCAB, gpt, tiny_config
from tolerance import F32_EPS, assert_close_bound, network_depth, rounding_bound

B = 2
pytestmark = pytest.mark.usefixtures("model_parallel")


def batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, SEQ), generator=g)
    return ids, torch.arange(SEQ).expand(B, SEQ)


def run(model, mask=None):
    ids, pos = batch()
    model.zero_grad(set_to_none=True)
    logits = model(ids, pos, mask)
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), ids.reshape(-1))
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# The chain of roundings behind one logit of tiny_config()'s model (tests/tolerance.py); backward doubles it.
DEPTH = network_depth(dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, max_position_embeddings=SEQ)) + VOCAB


def assert_same(a, b):
    """Two float32 models equal in exact arithmetic: logits and every gradient within the rounding bound
    on their magnitudes (the largest logit; the largest gradient anywhere)."""
    (la, ga), (lb, gb) = a, b
    assert_close_bound(la, lb, rounding_bound(torch.float32, la.abs().max(), DEPTH), "logits")
    assert set(ga) == set(gb)
    top = max(g.abs().max().item() for g in ga.values())
    for k in ga:
        assert_close_bound(ga[k], gb[k], rounding_bound(torch.float32, top, 2 * DEPTH), k)


def causal_plus_padding_mask():
    # Causal, and sample 1 cannot see its first 3 keys (every row keeps at least one key).
    m = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1).expand(B, 1, SEQ, SEQ).clone()
    m[1, :, 4:, :3] = True
    return m


MEGATRON_CASES = {
    # id: (megatron softmax_type, our variant kwargs (None = follow config), config overrides, mask)
    "off-by-one": ("off-by-one", dict(softmax="softmax1"), {}, None),
    "learnable": ("learnable", dict(softmax="learnable"), {}, None),
    "learnable-from-config": ("learnable", None, {}, None),
    "vanilla-gqa": ("vanilla", dict(), dict(num_query_groups=2), None),
    "vanilla-qk-layer-scaling": ("vanilla", dict(), dict(apply_query_key_layer_scaling=True, softmax_scale=0.3), None),
    "off-by-one-causal-mask": ("off-by-one", dict(softmax="softmax1"), {}, "causal"),
    "learnable-arbitrary-mask": ("learnable", dict(softmax="learnable"), {}, "arbitrary"),
    "vanilla-padding-mask": ("vanilla", dict(), {}, "padding"),
    # megatron-core's own elementwise output gate (its gate rows in linear_qkv) = our gate='elementwise'
    "output-gate": ("vanilla", dict(gate="elementwise"), dict(attention_output_gate=True), None),
    "output-gate-off-by-one-causal-mask": (
        "off-by-one",
        dict(softmax="softmax1", gate="elementwise"),
        dict(attention_output_gate=True),
        "causal",
    ),
    "output-gate-learnable-gqa-arbitrary-mask": (
        "learnable",
        dict(softmax="learnable", gate="elementwise"),
        dict(attention_output_gate=True, num_query_groups=2),
        "arbitrary",
    ),
    "output-gate-from-config": ("learnable", None, dict(attention_output_gate=True), "padding"),
}


@pytest.mark.parametrize("case", sorted(MEGATRON_CASES))
def test_matches_megatron_core(case):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig

    mg_type, ours, overrides, mask_kind = MEGATRON_CASES[case]
    mg = gpt(tiny_config(softmax_type=mg_type, **overrides), get_gpt_layer_local_spec(), seed=0)
    our_cfg = tiny_config(softmax_type=mg_type if ours is None else "vanilla", **overrides)
    variant = None if ours is None else AttentionVariantConfig(**ours)
    mine = gpt(our_cfg, get_outeff_layer_spec(variant), seed=1)
    mine.load_state_dict(mg.state_dict(), strict=True)  # same keys, softmax_offset included
    mask = {
        None: None,
        "causal": torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1),
        "arbitrary": causal_plus_padding_mask(),
        "padding": torch.zeros(B, 1, 1, SEQ, dtype=torch.bool).index_fill_(-1, torch.tensor([0, 5]), True),
    }[mask_kind]
    assert_same(run(mg, mask), run(mine, mask))
    if mg_type == "learnable":  # and back: our checkpoint loads into megatron's model
        mine2 = gpt(our_cfg, get_outeff_layer_spec(variant), seed=2)
        mg2 = gpt(tiny_config(softmax_type=mg_type, **overrides), get_gpt_layer_local_spec(), seed=3)
        mg2.load_state_dict(mine2.state_dict(), strict=True)
        assert_same(run(mg2, mask), run(mine2, mask))


def test_sharded_state_dict_key_matches_megatron():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig

    mg = gpt(tiny_config(softmax_type="learnable"), get_gpt_layer_local_spec())
    mine = gpt(tiny_config(), get_outeff_layer_spec(AttentionVariantConfig(softmax="learnable")))
    mk = {k: v.key for k, v in mg.sharded_state_dict().items() if "softmax_offset" in k}
    ok = {k: v.key for k, v in mine.sharded_state_dict().items() if "softmax_offset" in k}
    assert mk == ok and len(mk) == 2
    param = mine.decoder.layers[0].self_attention.core_attention.softmax_offset
    assert (param.tensor_model_parallel, param.partition_dim, param.partition_stride) == (True, 0, 1)


def _run_capturing_attention(model, attn) -> dict:
    """One forward of ``model`` recording ``attn``'s inputs, its core attention's inputs and output, and
    linear_proj's inputs."""
    store = {}
    hooks = [
        _capture(attn, store, "attn_in", inputs=True),
        _capture(attn.core_attention, store, "core_in", inputs=True),
        _capture(attn.core_attention, store, "core_out"),
        _capture(attn.linear_proj, store, "proj_in", inputs=True),
    ]
    ids, pos = batch()
    with torch.no_grad():
        model(ids, pos, None)
    for h in hooks:
        h.remove()
    return store


def _capture(module, store, key, inputs=False):
    def hook(mod, args, kwargs, output=None):
        store[key] = (args, kwargs) if inputs else output

    if inputs:
        return module.register_forward_pre_hook(lambda m, a, k: hook(m, a, k), with_kwargs=True)
    return module.register_forward_hook(lambda m, a, k, o: hook(m, a, k, o), with_kwargs=True)


@pytest.mark.parametrize("gate", ["linear", "mlp", "shared_linear"])
def test_gate_equals_hand_computation(gate):
    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig

    model = gpt(tiny_config(), get_outeff_layer_spec(AttentionVariantConfig(softmax="softmax1", gate=gate)))
    attn = model.decoder.layers[0].self_attention
    store = _run_capturing_attention(model, attn)
    x = store["attn_in"][1].get("hidden_states", store["attn_in"][0][0] if store["attn_in"][0] else None)  # [s, b, d]
    s, b, d = x.shape
    H, dh = 4, d // 4
    g = attn.head_gate
    with torch.no_grad():
        if gate == "linear":
            logits = torch.stack([x[..., h * dh : (h + 1) * dh] @ g.weight[h] for h in range(H)], -1) + g.bias
        elif gate == "mlp":
            logits = (
                torch.stack(
                    [
                        torch.relu(x[..., h * dh : (h + 1) * dh] @ g.fc1_weight[h].T + g.fc1_bias[h]) @ g.fc2_weight[h]
                        for h in range(H)
                    ],
                    -1,
                )
                + g.bias
            )
        else:
            logits = x @ g.weight.T + g.bias
        gate_val = torch.sigmoid(logits)  # [s, b, H]
        args, kwargs = store["core_in"]
        ungated = attn.core_attention(*args, **kwargs)  # outside gate_scope: no gate
    expected = (ungated.view(s, b, H, dh) * gate_val.unsqueeze(-1)).view(s, b, H * dh)
    # the same float32 products (one multiply per element; the gate's own sums over d_head / the MLP width)
    assert_close_bound(store["core_out"], expected, rounding_bound(torch.float32, expected.abs().max(), 2 * d))
    assert torch.equal(store["proj_in"][0][0], store["core_out"])  # the gated output feeds linear_proj
    # initial opening: bias = logit(0.25); the gate's mean over tokens and heads is ~0.25
    assert torch.allclose(g.bias, torch.full_like(g.bias, math.log(0.25 / 0.75)))
    assert abs(gate_val.mean().item() - 0.25) < 0.1
    for p in g.parameters():
        assert (p.tensor_model_parallel, p.partition_dim, p.partition_stride) == (True, 0, 1)


def test_gate_init_prob_exact_with_zero_weights():
    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig

    model = gpt(tiny_config(), get_outeff_layer_spec(AttentionVariantConfig(gate="linear", gate_init_prob=0.25)))
    g = model.decoder.layers[0].self_attention.head_gate
    with torch.no_grad():
        g.weight.zero_()
        out = g(torch.randn(SEQ, B, 64))
    assert out.shape == (B, SEQ, 4) and torch.allclose(out, torch.full_like(out, 0.25))


@pytest.mark.parametrize("gate", ["linear", "elementwise"])
def test_selective_recompute_of_core_attention_keeps_gate_gradients(gate):
    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig

    v = AttentionVariantConfig(softmax="softmax1", gate=gate)
    plain = gpt(tiny_config(v), get_outeff_layer_spec(v))
    recompute = gpt(
        tiny_config(v, recompute_granularity="selective", recompute_modules=["core_attn"]), get_outeff_layer_spec(v)
    )
    recompute.load_state_dict(plain.state_dict())
    assert recompute.decoder.layers[0].self_attention.checkpoint_core_attention
    assert_same(run(plain), run(recompute))


def test_attention_dropout_uses_model_parallel_rng():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig

    model = gpt(tiny_config(attention_dropout=0.3), get_outeff_layer_spec(AttentionVariantConfig(softmax="softmax1")))
    ids, pos = batch()
    tracker = get_cuda_rng_tracker()
    state = {k: v.clone() for k, v in tracker.get_states().items()}
    a = model(ids, pos, None)
    tracker.set_states({k: v.clone() for k, v in state.items()})
    torch.manual_seed(999)  # the default generator does not matter: dropout draws from the tracker
    b = model(ids, pos, None)
    model.eval()
    c = model(ids, pos, None)
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs_one_line_errors():
    from megatron_outeff.megatron.core_attention import check_variant_fits
    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig as V

    errors = []

    def expect(fn, needle):
        with pytest.raises(ValueError, match=needle) as e:
            fn()
        errors.append(str(e.value))

    expect(
        lambda: check_variant_fits(V(), tiny_config(num_attention_heads=2, hidden_size=64), 4),
        "not divisible by tensor_model_parallel_size=4",
    )
    expect(lambda: check_variant_fits(V(), tiny_config(num_attention_heads=8, num_query_groups=8), 3), "not divisible")
    expect(lambda: V(softmax="softmax_one"), "softmax='softmax_one'")
    expect(lambda: get_outeff_layer_spec(V(clip_alpha=12.0)), "sequence length")
    # mlp gate with head_dim 2 < 4: refused in OutEffSelfAttention before megatron builds the attention
    expect(
        lambda: gpt(
            tiny_config(hidden_size=8, num_attention_heads=4, ffn_hidden_size=16), get_outeff_layer_spec(V(gate="mlp"))
        ),
        "head_dim=2",
    )
    expect(lambda: gpt(tiny_config(kv_channels=8), get_outeff_layer_spec(V(gate="linear"))), "shared_linear")
    # the elementwise gate's rows live in linear_qkv: the config and the variant must agree, both ways
    expect(
        lambda: gpt(tiny_config(), get_outeff_layer_spec(V(gate="elementwise"))),
        "attention_output_gate=False conflicts",
    )
    expect(
        lambda: gpt(tiny_config(attention_output_gate=True), get_outeff_layer_spec(V(gate="linear"))),
        "attention_output_gate=True conflicts",
    )
    expect(
        lambda: check_variant_fits(V(gate="elementwise"), tiny_config(num_query_groups=2), 4), "num_query_groups=2 <"
    )
    expect(
        lambda: gpt(tiny_config(softmax_type="learnable"), get_outeff_layer_spec(V(softmax="softmax1"))), "conflicts"
    )
    assert all("\n" not in e for e in errors), errors


def test_wrong_offset_in_state_dict_touches_nothing():
    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.self_attention import install_state_dict_guard
    from megatron_outeff.megatron.variant import AttentionVariantConfig as V

    model = install_state_dict_guard(gpt(tiny_config(), get_outeff_layer_spec(V(softmax="learnable"))))
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    sd = {k: (torch.zeros_like(v) if torch.is_tensor(v) else v) for k, v in model.state_dict().items()}
    sd["decoder.layers.1.self_attention.core_attention.softmax_offset"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"layers\.1\.self_attention\.core_attention\.softmax_offset.*\(3,\)") as e:
        model.load_state_dict(sd)
    assert "\n" not in str(e.value)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was overwritten
    # a learnable-offset checkpoint into a softmax1 model: also refused up front
    other = install_state_dict_guard(gpt(tiny_config(), get_outeff_layer_spec(V(softmax="softmax1"))))
    with pytest.raises(ValueError, match="softmax='learnable' but this layer is 'softmax1'"):
        other.load_state_dict(model.state_dict())
    # without the guard the module's own check still gives one line
    plain = gpt(tiny_config(), get_outeff_layer_spec(V(softmax="learnable")))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        plain.load_state_dict(sd)


def test_mask_routing():
    """megatron mask conventions -> flash-able causal / key padding, or the materialised path."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec

    model = gpt(tiny_config(), get_outeff_layer_spec())
    core = model.decoder.layers[0].self_attention.core_attention
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1)
    pad = torch.zeros(B, 1, 1, SEQ, dtype=torch.bool)
    pad[0, ..., -2:] = True
    r = core._resolve_mask
    assert r(None, AttnMaskType.causal, B, SEQ, SEQ) == (True, None, None)
    assert r(None, AttnMaskType.causal, B, 1, SEQ) == (False, None, None)  # decode step: no mask
    assert r(None, AttnMaskType.padding, B, SEQ, SEQ) == (False, None, None)
    assert r(causal.expand(B, 1, SEQ, SEQ), AttnMaskType.causal, B, SEQ, SEQ) == (True, None, None)
    c, kpm, dense = r(pad, AttnMaskType.padding, B, SEQ, SEQ)
    assert not c and dense is None and kpm.tolist() == (~pad.view(B, SEQ)).tolist()
    arbitrary = causal_plus_padding_mask()
    c, kpm, dense = r(arbitrary, AttnMaskType.causal, B, SEQ, SEQ)
    assert (c, kpm) == (False, None) and dense is arbitrary
    with pytest.raises(ValueError, match="torch.bool"):
        r(causal.float(), AttnMaskType.causal, B, SEQ, SEQ)


def test_core_attention_alone_in_megatrons_self_attention():
    """OutEffCoreAttention.with_variant(...) in megatron's own local spec == our full spec."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_outeff.megatron.core_attention import OutEffCoreAttention
    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig as V

    v = V(softmax="learnable", clip_gamma=-0.03)
    spec = get_gpt_layer_local_spec()
    attn = spec.submodules.self_attention
    attn.submodules = dataclasses.replace(attn.submodules, core_attention=OutEffCoreAttention.with_variant(v))
    stock = gpt(tiny_config(), spec)
    ours = gpt(tiny_config(), get_outeff_layer_spec(v))
    ours.load_state_dict(stock.state_dict(), strict=True)
    assert_same(run(stock), run(ours))
    with pytest.raises(ValueError, match="OutEffSelfAttention"):
        OutEffCoreAttention.with_variant(V(gate="linear"))


@pytest.mark.parametrize("gate", ["linear", "elementwise"])
def test_static_kv_cache_decode_matches_full_forward(gate):
    """megatron's static-batching inference (prefill 8 tokens, then decode 1 at a time, sq=1)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig as V

    v = V(softmax="learnable", gate=gate, clip_gamma=-0.03)
    m = gpt(tiny_config(v), get_outeff_layer_spec(v)).eval()
    ids, pos = batch()
    with torch.no_grad():
        full = m(ids, pos, None)
        ctx = StaticInferenceContext(B, SEQ)
        out = [m(ids[:, :8], pos[:, :8], None, inference_context=ctx, runtime_gather_output=True)]  # last token only
        ctx.sequence_len_offset += 8
        for t in range(8, SEQ):
            out.append(m(ids[:, t : t + 1], pos[:, t : t + 1], None, inference_context=ctx, runtime_gather_output=True))
            ctx.sequence_len_offset += 1
    assert_close_bound(torch.cat(out, 1), full[:, 7:], rounding_bound(torch.float32, full.abs().max(), DEPTH))


def test_bf16_model_close_to_megatron():
    """bf16 (megatron's Float16Module): our off-by-one layer vs megatron's, same weights."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module

    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig as V

    kw = dict(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    mg = gpt(tiny_config(softmax_type="off-by-one", **kw), get_gpt_layer_local_spec())
    mine = gpt(tiny_config(**kw), get_outeff_layer_spec(V(softmax="softmax1")))
    mine.load_state_dict(mg.state_dict())
    ids, pos = batch()
    with torch.no_grad():
        a = Float16Module(mg.config, mg)(ids, pos, None).float()
        b = Float16Module(mine.config, mine)(ids, pos, None).float()
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item()


@pytest.mark.parametrize("softmax", ["softmax1", "learnable"])
def test_probe_probabilities_equal_an_independent_softmax(softmax):
    """The monitoring probe's probabilities (training's sink / first-token mass) against megatron-style
    concatenated-sink softmax in float64, on the layer's real inputs. The clip is set but the probe
    reports the softmax before clipping."""
    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig

    model = gpt(tiny_config(), get_outeff_layer_spec(AttentionVariantConfig(softmax=softmax, clip_gamma=-0.03)))
    core = model.decoder.layers[1].self_attention.core_attention
    offset = torch.zeros(4, dtype=torch.float64)
    if softmax == "learnable":
        offset = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
        with torch.no_grad():
            core.softmax_offset.copy_(offset)
    store = {}
    handle = _capture(core, store, "in", inputs=True)
    ids, pos = batch()
    with torch.no_grad():
        model(ids, pos, None)
    handle.remove()
    args, kwargs = store["in"]
    query, key, _, mask = args[:4]
    probs = core.probe_probabilities(query, key, mask, kwargs.get("attn_mask_type"))

    q, k = (t.permute(1, 2, 0, 3).double() for t in (query, key))  # [b, h, s, d]
    scores = (q @ k.transpose(-1, -2)) * core.softmax_scale
    s = scores.shape[-1]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    sink = offset.view(1, -1, 1, 1).expand(scores.shape[0], -1, s, 1)
    oracle = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    # float32 probabilities (<= 1) vs the float64 oracle: scores reduce over d_head, the softmax over s keys
    assert_close_bound(probs, oracle, rounding_bound(torch.float32, 1.0, q.shape[-1] + s))
    assert (1 - oracle.sum(-1)).min() > 0  # the sink holds mass on every row


def test_elementwise_gate_equals_a_hand_computation_and_opens_at_gate_init_prob():
    """The elementwise gate: head h's channel c of the core-attention output times sigmoid of the gate rows of
    linear_qkv (per head [q | gate | k | v], megatron-core's layout) applied to the layer input, before
    linear_proj; its bias rows start at logit(gate_init_prob), the q / k / v bias rows at megatron's 0."""
    from megatron_outeff.megatron.layer_spec import get_outeff_layer_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig

    v = AttentionVariantConfig(softmax="softmax1", gate="elementwise", gate_init_prob=0.3)
    model = gpt(tiny_config(v), get_outeff_layer_spec(v))
    attn = model.decoder.layers[0].self_attention
    H, dh = 4, 16
    bias = attn.linear_qkv.bias.detach().view(H, 4, dh)
    assert torch.allclose(bias[:, 1], torch.full((H, dh), math.log(0.3 / 0.7)))
    assert torch.equal(bias[:, [0, 2, 3]], torch.zeros(H, 3, dh))
    store = _run_capturing_attention(model, attn)
    with torch.no_grad():
        x = store["attn_in"][0][0]  # [s, b, 64] normed input
        w = attn.linear_qkv.weight.view(H, 4, dh, 64)[:, 1].reshape(H * dh, 64)
        gate = torch.sigmoid(x.double() @ w.double().T + bias[:, 1].reshape(-1).double())  # [s, b, H * dh]
        args, kwargs = store["core_in"]
        ungated = attn.core_attention(*args, **kwargs)  # outside gate_scope: no gate
    # the gate's float32 logits sum 64 products and the bias (sigmoid' <= 1/4), then one multiply by the output
    logit_magnitude = (x.abs() @ w.abs().T + bias[:, 1].reshape(-1).abs()).max()
    bound = float(ungated.abs().max()) * (rounding_bound(torch.float32, logit_magnitude, 65) / 4 + F32_EPS)
    assert_close_bound(store["core_out"], ungated.double() * gate, bound, "gated core attention")
    assert torch.equal(store["proj_in"][0][0], store["core_out"])
