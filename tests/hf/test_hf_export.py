"""Export every attention variant to a Hugging Face directory, reload it as remote code in a process
where megatron_outeff is not importable, and compare its logits with an independent oracle."""

import json
from pathlib import Path

import pytest
import torch
from hf_testlib import (
    TINY,
    TINY_350M,
    TINY_SHAPE,
    assert_reload_matches_oracle,
    export_random,
    oracle_logits,
    random_weights,
    reload_isolated,
)
from tolerance import assert_close_bound, network_depth, rounding_bound

from megatron_outeff.hf import (
    QUANT_POINTS_PER_LAYER,
    OutEffOPTConfig,
    OutEffOPTForCausalLM,
    export_hf_dir,
    fp16_overflow_check,
    fp16_overflow_report,
    resolve_variant,
)
from megatron_outeff.hf.export import is_plain_opt

VARIANTS = {
    "vanilla": {"softmax": "vanilla"},
    "softmax1": {"softmax": "softmax1"},
    "softmax_n": {"softmax": "softmax_n", "softmax_n": 2.5},
    "learnable": {"softmax": "learnable"},
    "clipped": {"softmax": "vanilla", "clip_gamma": -0.03, "clip_zeta": 1.0},
    "clipped_softmax1": {"softmax": "softmax1", "clip_gamma": -0.03, "clip_zeta": 1.0},
    "gated_linear": {"softmax": "vanilla", "gate": "linear"},
    "gated_mlp": {"softmax": "vanilla", "gate": "mlp"},
    "gated_shared_linear": {"softmax": "vanilla", "gate": "shared_linear"},
    "gated_softmax1": {"softmax": "softmax1", "gate": "linear"},
    "gated_elementwise": {"softmax": "vanilla", "gate": "elementwise"},
    "gated_elementwise_learnable_clipped": {
        "softmax": "learnable",
        "gate": "elementwise",
        "clip_gamma": -0.03,
        "clip_zeta": 1.0,
    },
}

VARIANTS_350M = ("vanilla", "softmax1", "learnable", "clipped", "gated_linear", "gated_elementwise")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_inputs):
    """Export all variants (same base weights) and load them all in ONE isolated subprocess."""
    root = tmp_path_factory.mktemp("hf_export")
    data = {name: export_random(root / name, variant, TINY) for name, variant in VARIANTS.items()}
    for name in VARIANTS_350M:  # same isolated subprocess: no extra launch
        data[f"opt_350m_{name}"] = export_random(root / f"opt_350m_{name}", VARIANTS[name], TINY_350M, seed=1)
    return data, reload_isolated(root, data, *tiny_inputs)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_isolated_reload_matches_oracle(exported, tiny_inputs, name):
    points = QUANT_POINTS_PER_LAYER * TINY["num_hidden_layers"]
    assert_reload_matches_oracle(exported, tiny_inputs, name, oracle_logits, network_depth(TINY), "opt", points)


@pytest.mark.parametrize("name", VARIANTS_350M)
def test_opt_350m_isolated_reload_matches_oracle(exported, tiny_inputs, name):
    """Post-LN + project_in/project_out: plain OPTForCausalLM (vanilla) and our remote code (the rest)."""
    data, loaded = exported
    ids, am = tiny_inputs
    d, got = data[f"opt_350m_{name}"], loaded[f"opt_350m_{name}"]
    assert d["sd"]["model.decoder.embed_tokens.weight"].shape == (TINY["vocab_size"], 32)
    assert "model.decoder.final_layer_norm.weight" not in d["sd"]
    # the oracle in float64, the reloaded model in float32: its own rounding only (tolerance.py)
    ref = oracle_logits({k: v.double() for k, v in d["sd"].items()}, d["fields"], ids, am, opt_kwargs=TINY_350M)
    real = am.bool()
    assert_close_bound(
        got["logits"][real], ref[real], rounding_bound(torch.float32, ref.abs().max(), network_depth(TINY_350M)), name
    )
    ref = ref.float()
    assert got["class"] == ("OPTForCausalLM" if name == "vanilla" else "OutEffOPTForCausalLM")
    # The oracle sees the post-LN placement: the pre-LN reading of the same weights differs.
    pre = dict(TINY_350M, do_layer_norm_before=True)
    sd_pre = {
        **d["sd"],
        "model.decoder.final_layer_norm.weight": torch.ones(64),
        "model.decoder.final_layer_norm.bias": torch.zeros(64),
    }
    assert (oracle_logits(sd_pre, d["fields"], ids, am, opt_kwargs=pre)[real] - ref[real]).abs().max() > 1e-2


def test_variants_change_the_output(exported, tiny_inputs):
    """Guard against a test that cannot see the variant: each differs from vanilla softmax on the same weights."""
    data, loaded = exported
    ids, am = tiny_inputs
    real = am.bool()
    base = loaded["vanilla"]["logits"][real]
    for name in VARIANTS:
        if name == "vanilla" or name.startswith("gated"):
            continue  # gated ones have extra weights; they differ from vanilla trivially
        assert (loaded[name]["logits"][real] - base).abs().max() > 1e-3, name
    # the clip really clips, on top of softmax1
    diff = loaded["clipped_softmax1"]["logits"][real] - loaded["softmax1"]["logits"][real]
    assert diff.abs().max() > 1e-4


def test_export_directory_layout(exported):
    data, _ = exported
    d = data["learnable"]["dir"]
    names = sorted(p.name for p in d.iterdir())
    for f in (
        "config.json",
        "model.safetensors",
        "modeling_outeff_opt.py",
        "configuration_outeff_opt.py",
        "outeff_deps.py",
        "reference.py",
        "variants.py",
        "gate.py",
        "points.py",
    ):
        assert f in names
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "outeff_opt" and cfg["softmax"] == "learnable"
    assert cfg["auto_map"] == {
        "AutoConfig": "configuration_outeff_opt.OutEffOPTConfig",
        "AutoModelForCausalLM": "modeling_outeff_opt.OutEffOPTForCausalLM",
    }
    import megatron_outeff.ops.gate as gate_mod
    import megatron_outeff.ops.reference as ref_mod
    import megatron_outeff.ops.variants as var_mod
    import megatron_outeff.quant.points as pts_mod

    for f, mod in (("reference.py", ref_mod), ("variants.py", var_mod), ("gate.py", gate_mod), ("points.py", pts_mod)):
        assert (d / f).read_bytes() == Path(mod.__file__).read_bytes()  # verbatim copies
    assert "megatron_outeff" not in (d / "outeff_deps.py").read_text().split('"""')[-1]
    v = data["vanilla"]["dir"]
    vcfg = json.loads((v / "config.json").read_text())
    assert vcfg["model_type"] == "opt" and "auto_map" not in vcfg
    assert not list(v.glob("*.py"))
    # no temporary directories left behind
    assert not [p for p in d.parent.iterdir() if p.name.startswith(".")]


def test_vanilla_loads_as_plain_opt(exported, tiny_inputs):
    from transformers import OPTConfig, OPTForCausalLM

    data, _ = exported
    ids, am = tiny_inputs
    loaded = OPTForCausalLM.from_pretrained(data["vanilla"]["dir"]).eval()
    built = OPTForCausalLM(OPTConfig(**TINY)).eval()
    missing, unexpected = built.load_state_dict(data["vanilla"]["sd"], strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    with torch.no_grad():
        a = loaded(input_ids=ids, attention_mask=am).logits
        b = built(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_quant_points_placed_and_identity(tiny_inputs):
    fields = resolve_variant({"softmax": "learnable", "gate": "linear", "clip_gamma": -0.03, "clip_zeta": 1.0})
    model = OutEffOPTForCausalLM(OutEffOPTConfig(**TINY, **fields)).eval()
    from megatron_outeff.quant.points import QuantPoint

    names = [n for n, m in model.named_modules() if isinstance(m, QuantPoint)]
    per_layer = [
        "self_attn.qk_quant",
        "self_attn.softmax_quant",
        "self_attn.pv_quant",
        "attn_residual_quant",
        "ffn_residual_quant",
    ]
    assert len(per_layer) == QUANT_POINTS_PER_LAYER
    assert sorted(names) == sorted(
        f"model.decoder.layers.{i}.{p}" for i in range(TINY["num_hidden_layers"]) for p in per_layer
    )
    seen = {}

    def hook(mod, inp, out):
        seen[mod] = (inp[0].shape, torch.equal(inp[0], out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, QuantPoint)]
    ids, am = tiny_inputs
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am)
    for h in handles:
        h.remove()
    assert len(seen) == len(names) and all(eq for _, eq in seen.values())
    attn = model.model.decoder.layers[0].self_attn
    b, s = ids.shape
    assert seen[attn.qk_quant][0] == (b, 4, s, s) and seen[attn.softmax_quant][0] == (b, 4, s, s)
    assert seen[attn.pv_quant][0] == (b, 4, s, 16)


@pytest.mark.parametrize("gate", ["mlp", "elementwise"])
def test_kv_cache_decoding_matches_full_forward(gate):
    fields = resolve_variant({"softmax": "learnable", "gate": gate, "clip_gamma": -0.03, "clip_zeta": 1.0})
    opt_sd, extra = random_weights(fields, seed=3)
    # Structural (cached keys/values must give the same logits): float64, so the bound is ~1e-12 on
    # any machine while a wrong cache position or mask is off by O(1).
    model = OutEffOPTForCausalLM(OutEffOPTConfig(**TINY, **fields)).eval()
    model.load_state_dict({**opt_sd, **extra}, strict=False)
    model.double()
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :5], use_cache=True)
        steps = [out.logits]
        past = out.past_key_values
        for t in range(5, 8):
            out = model(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
    assert full.dtype == torch.float64
    assert_close_bound(torch.cat(steps, 1), full, rounding_bound(torch.float64, full.abs().max(), network_depth(TINY)))


def test_clip_alpha_resolved_to_gamma():
    f = resolve_variant({"softmax": "softmax1", "clip_alpha": 12}, seq_length=512)
    assert f["clip_gamma"] == pytest.approx(-12 / 512) and f["clip_zeta"] == 1.0
    assert is_plain_opt(resolve_variant("vanilla")) and is_plain_opt(
        resolve_variant({"softmax": "softmax_n", "softmax_n": 0})
    )
    assert not is_plain_opt(resolve_variant({"softmax": "vanilla", "clip_gamma": -0.1, "clip_zeta": 1.1}))


def _one_line_error(fn, match):
    with pytest.raises(ValueError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_inputs_write_nothing(tmp_path):
    fields = resolve_variant("softmax1")
    opt_sd, extra = random_weights(fields, seed=1)
    # non-empty out dir
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    _one_line_error(lambda: export_hf_dir(full, opt_sd, TINY, "softmax1"), "not an empty directory")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    # non-finite weight, named
    bad = dict(opt_sd)
    bad["model.decoder.layers.1.fc2.weight"] = bad["model.decoder.layers.1.fc2.weight"].clone()
    bad["model.decoder.layers.1.fc2.weight"][0, 0] = float("nan")
    _one_line_error(
        lambda: export_hf_dir(tmp_path / "a", bad, TINY, "softmax1"),
        r"'model\.decoder\.layers\.1\.fc2\.weight'.*non-finite",
    )
    # unknown variant (softmax name, key, gate)
    _one_line_error(
        lambda: export_hf_dir(tmp_path / "b", opt_sd, TINY, "softmax2"), "unknown softmax variant 'softmax2'"
    )
    _one_line_error(
        lambda: export_hf_dir(tmp_path / "c", opt_sd, TINY, {"softmax": "softmax1", "temperature": 2}),
        "unknown variant key",
    )
    _one_line_error(lambda: export_hf_dir(tmp_path / "d", opt_sd, TINY, {"gate": "conv"}), "unknown gate variant")
    # weights of another variant (missing offsets)
    _one_line_error(lambda: export_hf_dir(tmp_path / "e", opt_sd, TINY, "learnable"), "missing.*softmax_offset")
    # fp16 overflow, named
    big = dict(opt_sd)
    big["model.decoder.layers.0.fc1.bias"] = big["model.decoder.layers.0.fc1.bias"] + 1e5
    assert len(fp16_overflow_report(big)) == 1
    _one_line_error(
        lambda: export_hf_dir(tmp_path / "f", big, TINY, "softmax1", dtype="fp16"),
        r"overflow fp16: model\.decoder\.layers\.0\.fc1\.bias",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_fp16_export_and_activation_report(tmp_path, tiny_inputs):
    fields = resolve_variant({"softmax": "softmax1", "gate": "shared_linear"})
    opt_sd, extra = random_weights(fields, seed=2)
    ids, _ = tiny_inputs
    out = export_hf_dir(
        tmp_path / "fp16", opt_sd, TINY, fields, extra_state=extra, dtype="fp16", calibration_batches=[ids]
    )
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    model = OutEffOPTForCausalLM(OutEffOPTConfig(**TINY, **fields)).eval()
    model.load_state_dict({**opt_sd, **extra}, strict=False)
    assert fp16_overflow_check(model, [ids]) is None
    with torch.no_grad():  # weights stay < 65504, activations do not
        model.model.decoder.layers[0].fc1.bias.fill_(5e4)
    first = fp16_overflow_check(model, [ids])
    assert first.startswith("model.decoder.layers.0.fc2: aten.") and "overflows fp16" in first
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert fp16_overflow_report(sd) == []
    _one_line_error(
        lambda: export_hf_dir(
            tmp_path / "fp16b",
            {k: v for k, v in sd.items() if k not in extra},
            TINY,
            fields,
            extra_state=extra,
            dtype="fp16",
            calibration_batches=[ids],
        ),
        "fp16 refused: model.decoder.layers.0.fc2",
    )
    assert not (tmp_path / "fp16b").exists()


def test_fresh_model_is_initialised_once_and_tied():
    import math

    cfg = OutEffOPTConfig(**TINY, softmax="learnable", gate="mlp", gate_init_prob=0.25)
    m = OutEffOPTForCausalLM(cfg)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert m.lm_head.weight is m.model.decoder.embed_tokens.weight
    attn = m.model.decoder.layers[1].self_attn
    assert torch.equal(attn.softmax_offset, torch.zeros(4))
    torch.testing.assert_close(attn.gate.fc2_bias, torch.full((4,), math.log(0.25 / 0.75)))
    assert 0.015 < float(m.model.decoder.layers[1].fc1.weight.detach().std()) < 0.025  # init_std 0.02
    assert torch.equal(m.model.decoder.layers[1].final_layer_norm.weight, torch.ones(64))


def test_config_holds_the_variant_under_its_field_names(tmp_path):
    """config.json is the variant's to_dict (flat keys, the owner's names) and reads back into the same
    variant; a config.json of an earlier export (clip_zeta null, no clip_alpha key) still loads."""
    from megatron_outeff.ops import AttentionVariantConfig

    v = AttentionVariantConfig(softmax="softmax_n", softmax_n=2.5, clip_gamma=-0.03, gate="mlp", gate_init_prob=0.3)
    cfg = OutEffOPTConfig(**TINY, **v.to_dict())
    assert cfg.attention_variant() == v
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in v.to_dict()} == v.to_dict()
    assert OutEffOPTConfig.from_pretrained(tmp_path).attention_variant() == v
    old = {k: val for k, val in saved.items() if k != "clip_alpha"}
    old.update(clip_gamma=None, clip_zeta=None)
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert OutEffOPTConfig.from_pretrained(tmp_path).attention_variant() == v.replace(clip_gamma=None)
    for kwargs, needle in (
        (dict(softmax="softmax2"), "softmax='softmax2'"),
        (dict(clip_alpha=12), "needs the training sequence length"),
        (dict(hidden_size=8, gate="mlp"), "head_dim=2"),
    ):
        _one_line_error(lambda kwargs=kwargs: OutEffOPTConfig(**{**TINY, **kwargs}), needle)


def test_elementwise_gate_equals_transformers_qwen3_next_gated_attention():
    """The elementwise gate against transformers' own gated attention: Qwen3-Next's attention (q_proj's rows per
    head are [query | gate], output * sigmoid(gate), Qiu et al.'s G1 gate), float64, with its per-head q / k
    RMSNorms replaced by identities and rotary embeddings at angle 0 (cos 1, sin 0), so that it is plain
    multi-head attention with that gate; ours (vanilla softmax, gate='elementwise') gets the same weights:
    q_proj / gate_proj are the two halves of its fused q_proj (q pre-scaled in OPT; the scale is the same)."""
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention

    # the tiny shape of every model here (ours: OutEffOPTConfig(**TINY)), multi-head
    H, D, b, s = TINY_SHAPE["num_attention_heads"], TINY_SHAPE["hidden_size"], 2, 7
    d = D // H
    qcfg = Qwen3NextConfig(**TINY_SHAPE, num_key_value_heads=H, head_dim=d, attention_bias=True, attention_dropout=0.0)
    qcfg._attn_implementation = "eager"
    theirs = Qwen3NextAttention(qcfg, layer_idx=0).double().eval()
    theirs.q_norm, theirs.k_norm = torch.nn.Identity(), torch.nn.Identity()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    fields = resolve_variant({"softmax": "vanilla", "gate": "elementwise"})
    ours = OutEffOPTForCausalLM(OutEffOPTConfig(**TINY, **fields)).double().eval().model.decoder.layers[0].self_attn
    qg_w = theirs.q_proj.weight.view(H, 2, d, D)
    qg_b = theirs.q_proj.bias.view(H, 2, d)
    with torch.no_grad():
        for mine, w, bias in (
            (ours.q_proj, qg_w[:, 0], qg_b[:, 0]),
            (ours.gate_proj, qg_w[:, 1], qg_b[:, 1]),
            (ours.k_proj, theirs.k_proj.weight, theirs.k_proj.bias),
            (ours.v_proj, theirs.v_proj.weight, theirs.v_proj.bias),
            (ours.out_proj, theirs.o_proj.weight, theirs.o_proj.bias),
        ):
            mine.weight.copy_(w.reshape(mine.weight.shape))
            mine.bias.copy_(bias.reshape(mine.bias.shape))
    x = torch.randn(b, s, D, generator=g, dtype=torch.float64)
    causal = torch.full((s, s), float("-inf"), dtype=torch.float64).triu(1).expand(b, 1, s, s)
    angle0 = (torch.ones(b, s, d, dtype=torch.float64), torch.zeros(b, s, d, dtype=torch.float64))
    with torch.no_grad():
        want, _ = theirs(x, position_embeddings=angle0, attention_mask=causal)
        got, _ = ours(x, attention_mask=causal)
    # float64 on both sides except transformers' eager softmax, which runs in float32 (dtype=torch.float32):
    # its probabilities carry float32 rounding over the s keys, propagated through P V and o_proj (the
    # largest output as magnitude); a wrong layout or gate is off by O(1)
    assert_close_bound(got, want, rounding_bound(torch.float32, want.abs().max(), 2 * s))
    with torch.no_grad():  # the comparison sees the gate: opened fully (sigmoid = 1) the output is another one
        ours.gate_proj.bias.fill_(50.0)
        assert (ours(x, attention_mask=causal)[0] - want).abs().max() > 1e-2


def test_elementwise_gate_linear_is_quantized_by_the_simulated_w8a8(tiny_inputs):
    """The paper's simulated W8A8 (evaluation's exclusions: the LM head and per-head gates) quantizes the
    elementwise gate's Linear like q / k / v / out_proj: its weight on the 8-bit grid, its output observed."""
    from megatron_outeff.evaluation.quant_eval import SIMULATED_EXCLUDE
    from megatron_outeff.quant.simulated import apply_simulated_w8a8

    fields = resolve_variant({"softmax": "softmax1", "gate": "elementwise"})
    opt_sd, extra = random_weights(fields, seed=4)
    model = OutEffOPTForCausalLM(OutEffOPTConfig(**TINY, **fields)).eval()
    model.load_state_dict({**opt_sd, **extra}, strict=False)
    ids, am = tiny_inputs
    sim = apply_simulated_w8a8(model, lambda m: m(input_ids=ids, attention_mask=am), exclude=SIMULATED_EXCLUDE)
    for i in range(TINY["num_hidden_layers"]):
        name = f"model.decoder.layers.{i}.self_attn.gate_proj"
        assert name in sim.weight_quantizers and name in sim.act_quantizers and name not in sim.uncalibrated
        w = sim.model.get_submodule(name).weight
        levels = torch.unique(torch.round(w / (w.abs().max() / 127)))
        assert levels.numel() <= 255 and not torch.equal(w, model.get_submodule(name).weight)
    assert "lm_head" in sim.excluded
