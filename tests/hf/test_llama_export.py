"""The Llama family's Hugging Face export: vanilla as a plain transformers LlamaForCausalLM directory, every
other variant as self-contained remote code (OutEffLlamaForCausalLM, built on transformers' Llama modules).
Every directory is reloaded in ONE process where megatron_outeff is not importable and compared with an
independent float64 oracle (RoPE, RMSNorm, SwiGLU and grouped-query attention written from their
definitions here, the attention by the project's operator); KV-cache generation and padded batches are
structural checks in float64."""

import pytest
import torch
from hf_testlib import (
    TINY_LLAMA,
    assert_reload_matches_oracle,
    export_random,
    head_gate,
    oracle_attention,
    random_llama_weights,
    reload_isolated,
)
from tolerance import assert_close_bound, network_depth, rounding_bound

DEPTH = network_depth(dict(hidden_size=64, ffn_dim=2 * 96, num_hidden_layers=2, max_position_embeddings=32))
VARIANTS = {
    "vanilla": {"softmax": "vanilla"},
    "softmax1": {"softmax": "softmax1"},
    "learnable": {"softmax": "learnable"},
    "clipped_softmax1": {"softmax": "softmax1", "clip_gamma": -0.03, "clip_zeta": 1.0},
    "gated_linear": {"softmax": "vanilla", "gate": "linear"},
    "gated_mlp": {"softmax": "vanilla", "gate": "mlp"},
    "gated_softmax1": {"softmax": "softmax1", "gate": "linear"},
    "elementwise_softmax1": {"softmax": "softmax1", "gate": "elementwise"},
}


def oracle_logits(sd, fields, ids, am):
    """Plain-torch Llama forward from the definitions: RMSNorm, half-split RoPE (theta_j = 10000^(-2j/d),
    position p rotates the pair (x_j, x_{j+d/2}) by p theta_j), query head h reading key/value head
    h // (H/G), SwiGLU, untied head; the attention by ``outeff_attention(..., impl="torch")``, gates from
    their definition (per head; elementwise: sigmoid(x W_g^T) per head and channel; as tests/hf/hf_testlib.py
    for OPT). Positions 0..s-1 in every row."""
    H, G, D = TINY_LLAMA["num_attention_heads"], TINY_LLAMA["num_key_value_heads"], TINY_LLAMA["hidden_size"]
    d, (b, s) = D // H, ids.shape

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + TINY_LLAMA["rms_norm_eps"]) * w

    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(s, dtype=torch.float64)[:, None] * theta[None]  # [s, d/2]
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]

    def rope(x):  # [b, s, heads, d]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    x = sd["model.embed_tokens.weight"][ids]
    for i in range(TINY_LLAMA["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = rope((h @ sd[p + "self_attn.q_proj.weight"].T).view(b, s, H, d))
        k = rope((h @ sd[p + "self_attn.k_proj.weight"].T).view(b, s, G, d)).repeat_interleave(H // G, dim=2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(b, s, G, d).repeat_interleave(H // G, dim=2)
        kind = fields.get("gate", "none")
        gate = head_gate(h, sd, p + "self_attn.gate", kind, H)
        if kind == "elementwise":  # per head and channel: sigmoid(h W_g^T), no bias (Llama)
            gate = torch.sigmoid(h @ sd[p + "self_attn.gate_proj.weight"].T).view(b, s, H, d)
        o = oracle_attention(q, k, v, fields, sd.get(p + "self_attn.softmax_offset"), gate, am)
        x = x + o.reshape(b, s, D) @ sd[p + "self_attn.o_proj.weight"].T
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        ffn = torch.nn.functional.silu(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)
        x = x + ffn @ sd[p + "mlp.down_proj.weight"].T
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_inputs):
    """Export every variant (same base weights) and load them all in ONE isolated subprocess."""
    root = tmp_path_factory.mktemp("llama_export")
    data = {name: export_random(root / name, v, TINY_LLAMA, family="llama") for name, v in VARIANTS.items()}
    return data, reload_isolated(root, data, *tiny_inputs)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_isolated_reload_matches_oracle(exported, tiny_inputs, name):
    points = 5 * TINY_LLAMA["num_hidden_layers"]
    assert_reload_matches_oracle(exported, tiny_inputs, name, oracle_logits, DEPTH, "llama", points)
    files = sorted(p.name for p in exported[0][name]["dir"].iterdir())
    if name == "vanilla":  # transformers' own class, no code in the directory
        assert files == ["config.json", "generation_config.json", "model.safetensors"]
    else:  # remote code
        assert {"modeling_outeff_llama.py", "remote_attention.py", "outeff_deps.py"} <= set(files)
        assert "modeling_outeff_opt.py" not in files  # the shared pieces only, not the OPT model


def test_the_oracle_sees_each_variant_and_the_grouping(exported, tiny_inputs):
    """Guards: every variant changes the function on the same weights, and the oracle itself fails when its
    query heads read the wrong key/value heads (so the reload check above can see that mistake)."""
    data, loaded = exported
    ids, am = tiny_inputs
    real = am.bool()
    for name in VARIANTS:
        if name != "vanilla" and not name.startswith("gated"):  # gated ones carry other random tensors: differ anyway
            assert (loaded[name]["logits"][real] - loaded["vanilla"]["logits"][real]).abs().max() > 1e-3, name
    sd = {k: v.double() for k, v in data["vanilla"]["sd"].items()}
    for i in range(TINY_LLAMA["num_hidden_layers"]):  # swap the two key/value heads: groups now pair with other queries
        k = f"model.layers.{i}.self_attn.k_proj.weight"
        sd[k] = sd[k].view(2, -1, 64).flip(0).reshape(-1, 64)
    assert (oracle_logits(sd, {}, ids, am)[real] - loaded["vanilla"]["logits"][real].double()).abs().max() > 1e-2


def _double(model):
    return model.to(torch.float64).eval()


def test_outeff_vanilla_is_transformers_llama():
    """Our remote code with vanilla softmax computes transformers' own Llama (same weights). float32: the
    eager softmax of transformers' Llama rounds its probabilities to float32 even in a float64 model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_outeff.hf.configuration_outeff_llama import OutEffLlamaConfig
    from megatron_outeff.hf.modeling_outeff_llama import OutEffLlamaForCausalLM

    plain, _ = random_llama_weights({})
    ref = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    ref.config._attn_implementation = "eager"
    ref.load_state_dict(plain)
    ours = OutEffLlamaForCausalLM(OutEffLlamaConfig(**TINY_LLAMA, softmax="vanilla"))
    ours.load_state_dict(plain)
    ids = torch.randint(2, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = ours.eval()(ids).logits, ref.eval()(ids).logits
    assert_close_bound(
        a, b, rounding_bound(torch.float32, b.abs().max(), DEPTH), "OutEffLlama(vanilla) vs LlamaForCausalLM"
    )


@pytest.mark.parametrize("name", ["softmax1", "learnable", "gated_softmax1", "elementwise_softmax1"])
def test_kv_cache_and_padded_batches_in_float64(exported, name):
    """Our remote code, structurally in float64: decoding token by token with the KV cache gives the logits
    of full recomputation, and a left-padded batch (position ids from the mask, as generate makes them)
    gives each row its unpadded logits. (The plain vanilla export is transformers' own code, whose eager
    softmax rounds to float32; the exporter's reload check covers its cache and padding.)"""
    from transformers import AutoModelForCausalLM

    data, _ = exported
    model = _double(AutoModelForCausalLM.from_pretrained(str(data[name]["dir"]), trust_remote_code=True))
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(2, 256, (n,), generator=g) for n in (3, 8)]
    with torch.no_grad():
        for p in prompts:
            out = model(p[None], use_cache=True)
            cache, seq, steps = out.past_key_values, p[None], [out.logits[0, -1]]
            for _ in range(4):
                seq = torch.cat([seq, steps[-1].argmax()[None, None]], dim=1)
                out = model(seq[:, -1:], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                steps.append(out.logits[0, -1])
            full = model(seq).logits[0, len(p) - 1 :]
            assert_close_bound(
                torch.stack(steps),
                full,
                rounding_bound(torch.float64, full.abs().max(), DEPTH),
                f"{name}: cached vs recomputed",
            )
        width = max(len(p) for p in prompts)
        batch = torch.stack([torch.cat([torch.ones(width - len(p), dtype=torch.long), p]) for p in prompts])
        mask = torch.stack(
            [
                torch.cat([torch.zeros(width - len(p), dtype=torch.long), torch.ones(len(p), dtype=torch.long)])
                for p in prompts
            ]
        )
        padded = model(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        for r, p in enumerate(prompts):
            single = model(p[None]).logits[0]
            assert_close_bound(
                padded[r, width - len(p) :],
                single,
                rounding_bound(torch.float64, single.abs().max(), DEPTH),
                f"{name}: padded row {r}",
            )
