"""Helpers for the Hugging Face export tests: tiny random OPT and Llama weights, an independent OPT oracle, and
the reload of exported directories where megatron_outeff is not importable.

(A uniquely named module, not conftest.py: several test folders have a conftest.)"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

# The sizes every tiny model of these tests has, in both families: vocabulary 256 (pad id 1), hidden 64 in 4
# heads of 16, 2 layers, 32 positions.
TINY_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=32,
    pad_token_id=1,
)
TINY = dict(TINY_SHAPE, ffn_dim=128, dropout=0.0, attention_dropout=0.0)  # OPT
# OPT-350m's shape in miniature: post-LayerNorm, 32-wide embeddings projected to the 64-wide model.
TINY_350M = dict(TINY, do_layer_norm_before=False, word_embed_proj_dim=32)
# Llama: grouped-query attention (4 query heads on 2 key/value heads), SwiGLU width 96, an untied head.
TINY_LLAMA = dict(
    TINY_SHAPE,
    intermediate_size=96,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
# Llama 3.1's published "llama3" RoPE scaling (its config.json rope_scaling; megatron-core's rope_scaling).
LLAMA31_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def randomise(model, seed: int):
    """(plain state dict, variant tensors) of ``model`` (either family), every tensor drawn anew so that a
    swapped or dropped one cannot hide: norm weights around 1, learnable offsets N(0, 2^2), q / k projections
    N(0, 0.5^2) (sharp enough attention to see the softmax), the rest N(0, 0.2^2); a tied LM head is left out."""
    g = torch.Generator().manual_seed(seed)
    plain, extra = {}, {}
    for k, t in model.state_dict().items():
        if k == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if k.endswith("norm.weight"):
            v = 1.0 + 0.2 * torch.randn(t.shape, generator=g)
        elif "softmax_offset" in k:
            v = 2.0 * torch.randn(t.shape, generator=g)
        else:
            v = (0.5 if "q_proj" in k or "k_proj" in k else 0.2) * torch.randn(t.shape, generator=g)
        (extra if ("softmax_offset" in k or ".gate." in k or "self_attn.gate_proj" in k) else plain)[k] = v
    return plain, extra


def random_weights(fields: dict, seed: int = 0, opt_kwargs: dict = TINY):
    """(hf_opt_state_dict, extra_state) of a tiny OPT of this variant, every tensor random."""
    from megatron_outeff.hf import OutEffOPTConfig, OutEffOPTForCausalLM

    return randomise(OutEffOPTForCausalLM(OutEffOPTConfig(**opt_kwargs, **fields)), seed)


def random_llama_weights(fields: dict, seed: int = 0):
    """(Llama state dict, variant tensors) of a tiny Llama of this variant, every tensor random."""
    from megatron_outeff.hf.configuration_outeff_llama import OutEffLlamaConfig
    from megatron_outeff.hf.modeling_outeff_llama import OutEffLlamaForCausalLM

    return randomise(OutEffLlamaForCausalLM(OutEffLlamaConfig(**TINY_LLAMA, **fields)), seed)


def export_random(out_dir, variant, config: dict, seed: int = 0, family: str = "opt") -> dict:
    """Exports random weights of ``variant`` (a tiny model of ``config``'s shape) to ``out_dir``:
    dict(fields=the resolved variant, sd=every exported tensor, dir=the directory)."""
    from megatron_outeff.hf import export_hf_dir, resolve_variant

    fields = resolve_variant(variant)
    if family == "llama":
        plain, extra = random_llama_weights(fields, seed)
    else:
        plain, extra = random_weights(fields, seed, opt_kwargs=config)
    out = export_hf_dir(out_dir, plain, config, variant, extra_state=extra, family=family)
    return dict(fields=fields, sd={**plain, **extra}, dir=out)


def reload_isolated(root: Path, data: dict, ids: torch.Tensor, am: torch.Tensor) -> dict:
    """{name: dict(logits, class, module, quant_points, megatron_outeff_loaded)} of each exported directory
    ``data[name]["dir"]`` (export_random's results), loaded with AutoModelForCausalLM(trust_remote_code=True)
    and run on (ids, attention mask am) in ONE ``python -S`` process where megatron_outeff is not importable
    (_load_isolated.py); its Hugging Face cache under ``root``."""
    job, res = root / "job.pt", root / "result.pt"
    torch.save({"dirs": {n: str(d["dir"]) for n, d in data.items()}, "ids": ids, "am": am}, job)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONNOUSERSITE="1")
    script = Path(__file__).with_name("_load_isolated.py")
    proc = subprocess.run(
        [sys.executable, "-S", str(script), sysconfig.get_paths()["purelib"], str(job), str(res)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(res)


def head_gate(h: torch.Tensor, sd: dict, prefix: str, kind: str, heads: int):
    """The per-head gate [b, s, H] of the gate ``kind`` at ``prefix`` (``...self_attn.gate``) on the layer
    input ``h`` [b, s, D], from its definition (Bondarenko et al.): ``linear``: head j's slice of h times its
    vector; ``shared_linear``: all of h times one vector per head; ``mlp``: a ReLU MLP per head on its slice.
    None for a gate that is not per head."""
    b, s, D = h.shape
    xs = h.view(b, s, heads, D // heads)
    if kind == "linear":
        logits = [xs[:, :, j] @ sd[prefix + ".weight"][j] + sd[prefix + ".bias"][j] for j in range(heads)]
    elif kind == "shared_linear":
        return torch.sigmoid(h @ sd[prefix + ".weight"].T + sd[prefix + ".bias"])
    elif kind == "mlp":
        logits = [
            torch.relu(xs[:, :, j] @ sd[prefix + ".fc1_weight"][j].T + sd[prefix + ".fc1_bias"][j])
            @ sd[prefix + ".fc2_weight"][j]
            + sd[prefix + ".fc2_bias"][j]
            for j in range(heads)
        ]
    else:
        return None
    return torch.sigmoid(torch.stack(logits, -1))


def oracle_attention(q, k, v, fields: dict, offset, gate, attention_mask: torch.Tensor) -> torch.Tensor:
    """Causal attention of the variant ``fields`` on q [b, s, H, d] and k, v (as many heads), by the project's
    operator ``outeff_attention(..., impl="torch")``: the learnable ``offset`` [H] (used only by that softmax),
    the clip (gamma, zeta), a ``gate`` to multiply the output by, and key padding from ``attention_mask`` [b, s]
    (1 = a real token)."""
    from megatron_outeff.ops import outeff_attention

    softmax = fields.get("softmax", "vanilla")
    return outeff_attention(
        q,
        k,
        v,
        softmax=softmax,
        n=fields.get("softmax_n", 1.0),
        offset=offset if softmax == "learnable" else None,
        clip=None if fields.get("clip_gamma") is None else (fields["clip_gamma"], fields["clip_zeta"]),
        gate=gate,
        causal=True,
        key_padding_mask=attention_mask.bool(),
        impl="torch",
    )


def assert_reload_matches_oracle(exported, tiny_inputs, name: str, oracle, depth: int, family: str, points: int):
    """Export ``name`` of an ``exported`` fixture ((data, reload_isolated's result) of ``family``) against
    ``oracle(float64 state dict, fields, ids, am)`` on ``tiny_inputs`` (ids, am): the oracle in float64, the
    reloaded model in float32, so the bound is its own rounding on a chain of ``depth`` (tests/tolerance.py).
    Loaded without megatron_outeff; at the real (non-padding) query positions for every variant; vanilla as
    transformers' own class, every other variant as our remote code, on every row (fully masked left-padding
    rows give a zero attention output, as in the oracle) and with ``points`` QuantPoints."""
    from tolerance import assert_close_bound, rounding_bound

    (data, loaded), (ids, am) = exported, tiny_inputs
    got = loaded[name]
    ref = oracle({k: v.double() for k, v in data[name]["sd"].items()}, data[name]["fields"], ids, am)
    bound = rounding_bound(torch.float32, ref.abs().max(), depth)
    plain = {"opt": "OPT", "llama": "Llama"}[family]
    assert not got["megatron_outeff_loaded"]
    real = am.bool()
    assert_close_bound(got["logits"][real], ref[real], bound, name)
    if name == "vanilla":
        assert got["class"] == f"{plain}ForCausalLM" and got["module"].startswith(f"transformers.models.{family}")
    else:
        assert_close_bound(got["logits"], ref, bound, name)
        assert got["class"] == f"OutEff{plain}ForCausalLM" and got["module"].startswith("transformers_modules")
        assert len(got["quant_points"]) == points


def layer_norm(x, sd, prefix, eps=1e-5):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def linear(x, sd, prefix):
    return torch.nn.functional.linear(x, sd[prefix + ".weight"], sd[prefix + ".bias"])


def oracle_logits(sd: dict, fields: dict, ids: torch.Tensor, attention_mask: torch.Tensor, opt_kwargs: dict = TINY):
    """Plain-torch OPT forward (ReLU, learned positions offset 2, tied head) whose attention is
    the project's operator ``outeff_attention(..., impl="torch")``; gates computed here from their definition.
    Pre-LN by default; ``opt_kwargs`` with ``do_layer_norm_before=False`` (OPT-350m) normalises after each
    residual add and has no final LayerNorm; ``word_embed_proj_dim`` != hidden_size adds the bias-free
    ``project_in`` (after the token lookup) and ``project_out`` (before the tied head)."""
    H, D = opt_kwargs["num_attention_heads"], opt_kwargs["hidden_size"]
    d = D // H
    b, s = ids.shape
    am = attention_mask.long()
    pos = (torch.cumsum(am, 1) * am - 1) + 2
    pre_ln = opt_kwargs.get("do_layer_norm_before", True)
    projected = opt_kwargs.get("word_embed_proj_dim", D) != D
    x = sd["model.decoder.embed_tokens.weight"][ids]
    if projected:
        x = x @ sd["model.decoder.project_in.weight"].T
    x = x + sd["model.decoder.embed_positions.weight"][pos]
    for i in range(opt_kwargs["num_hidden_layers"]):
        p = f"model.decoder.layers.{i}"
        h = layer_norm(x, sd, f"{p}.self_attn_layer_norm") if pre_ln else x
        q, k, v = (linear(h, sd, f"{p}.self_attn.{n}_proj").view(b, s, H, d) for n in "qkv")
        kind = fields.get("gate", "none")
        gate = head_gate(h, sd, f"{p}.self_attn.gate", kind, H)
        offset = sd.get(f"{p}.self_attn.softmax_offset")
        o = oracle_attention(q, k, v, fields, offset, gate, attention_mask)
        if kind == "elementwise":  # Qiu et al.: o * sigmoid(x W^T + b), per head and channel, here in plain torch
            o = o * torch.sigmoid(linear(h, sd, f"{p}.self_attn.gate_proj")).view(b, s, H, d)
        x = x + linear(o.reshape(b, s, D), sd, f"{p}.self_attn.out_proj")
        if not pre_ln:
            x = layer_norm(x, sd, f"{p}.self_attn_layer_norm")
        h = layer_norm(x, sd, f"{p}.final_layer_norm") if pre_ln else x
        x = x + linear(torch.relu(linear(h, sd, f"{p}.fc1")), sd, f"{p}.fc2")
        if not pre_ln:
            x = layer_norm(x, sd, f"{p}.final_layer_norm")
    if pre_ln:
        x = layer_norm(x, sd, "model.decoder.final_layer_norm")
    if projected:
        x = x @ sd["model.decoder.project_out.weight"].T
    return x @ sd["model.decoder.embed_tokens.weight"].T
