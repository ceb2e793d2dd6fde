"""Helpers for the Hugging Face export tests: tiny random OPT weights and an independent oracle.

(A uniquely named module, not conftest.py: several test folders have a conftest.)"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    ffn_dim=128,
    num_attention_heads=4,
    max_position_embeddings=32,
    dropout=0.0,
    attention_dropout=0.0,
    pad_token_id=1,
)


def random_weights(fields: dict, seed: int = 0, opt_kwargs: dict = TINY):
    """(hf_opt_state_dict, extra_state) of a tiny model of this variant, every tensor random."""
    from megatron_outeff.hf import OutEffOPTConfig, OutEffOPTForCausalLM

    cfg = OutEffOPTConfig(**opt_kwargs, **fields)
    model = OutEffOPTForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    opt, extra = {}, {}
    for k, t in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        if k.endswith("layer_norm.weight"):
            v = 1.0 + 0.2 * torch.randn(t.shape, generator=g)
        elif "softmax_offset" in k:
            v = 2.0 * torch.randn(t.shape, generator=g)
        elif "q_proj" in k or "k_proj" in k:
            v = 0.5 * torch.randn(t.shape, generator=g)
        else:
            v = 0.2 * torch.randn(t.shape, generator=g)
        (extra if ("softmax_offset" in k or ".gate." in k or ".gate_proj." in k) else opt)[k] = v
    return opt, extra


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
    from megatron_outeff.ops import outeff_attention

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
    clip = None if fields.get("clip_gamma") is None else (fields["clip_gamma"], fields["clip_zeta"])
    for i in range(opt_kwargs["num_hidden_layers"]):
        p = f"model.decoder.layers.{i}"
        h = layer_norm(x, sd, f"{p}.self_attn_layer_norm") if pre_ln else x
        q, k, v = (linear(h, sd, f"{p}.self_attn.{n}_proj").view(b, s, H, d) for n in "qkv")
        gate, kind, gp = None, fields.get("gate", "none"), f"{p}.self_attn.gate"
        if kind == "linear":
            xs = h.view(b, s, H, d)
            gate = torch.sigmoid(
                torch.stack([xs[:, :, j] @ sd[gp + ".weight"][j] + sd[gp + ".bias"][j] for j in range(H)], -1)
            )
        elif kind == "shared_linear":
            gate = torch.sigmoid(h @ sd[gp + ".weight"].T + sd[gp + ".bias"])
        elif kind == "mlp":
            xs = h.view(b, s, H, d)
            cols = []
            for j in range(H):
                hid = torch.relu(xs[:, :, j] @ sd[gp + ".fc1_weight"][j].T + sd[gp + ".fc1_bias"][j])
                cols.append(hid @ sd[gp + ".fc2_weight"][j] + sd[gp + ".fc2_bias"][j])
            gate = torch.sigmoid(torch.stack(cols, -1))
        softmax = fields.get("softmax", "vanilla")
        o = outeff_attention(
            q,
            k,
            v,
            softmax=softmax,
            n=fields.get("softmax_n", 1.0),
            offset=sd.get(f"{p}.self_attn.softmax_offset") if softmax == "learnable" else None,
            clip=clip,
            gate=gate,
            causal=True,
            key_padding_mask=attention_mask.bool(),
            impl="torch",
        )
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
