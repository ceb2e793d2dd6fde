"""OPT-350m (post-LayerNorm, word_embed_proj_dim != hidden_size) in megatron at TP=1, every attention variant.

Oracles: transformers' OPTForCausalLM (vanilla) and the plain-torch OPT forward of tests/hf/hf_testlib.py
(every variant; it reads the Hugging Face tensors directly). TP=2 / PP=2 parity runs in the torchrun
worker of test_opt_parity.py; conversion, training and export in tests/convert/test_opt_350m_pipeline.py.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
import hf_testlib  # noqa: E402
from hf_testlib import oracle_logits, random_weights  # noqa: E402
from tolerance import network_depth, rounding_bound  # noqa: E402

from megatron_outeff.megatron.parallel import init_model_parallel  # noqa: E402

# OPT-350m's shape in miniature (hidden 64, embedding 32, 2 post-LN layers); a vocabulary of 250, not a multiple
# of 8: megatron pads it.
TINY_350M = dict(hf_testlib.TINY_350M, vocab_size=250)
# float32 on both sides, whatever order each path's kernels sum in: n eps max|x| (tests/tolerance.py), n the
# network's reduction depth at the tests' 12 tokens; gradients pass the same reductions backward (2n)
DEPTH = network_depth(dict(TINY_350M, max_position_embeddings=12))

# (Hugging Face remote-code fields, megatron AttentionVariantConfig fields); None = megatron's own attention.
VARIANTS = {
    "megatron_vanilla": ({"softmax": "vanilla"}, None),
    "vanilla": ({"softmax": "vanilla"}, {}),
    "softmax1": ({"softmax": "softmax1"}, {"softmax": "softmax1"}),
    "softmax_n": ({"softmax": "softmax_n", "softmax_n": 2.5}, {"softmax": "softmax_n", "softmax_n": 2.5}),
    "learnable": ({"softmax": "learnable"}, {"softmax": "learnable"}),
    "clipped": ({"softmax": "vanilla", "clip_gamma": -0.03, "clip_zeta": 1.0}, {"clip_gamma": -0.03, "clip_zeta": 1.0}),
    "gated_linear": ({"softmax": "vanilla", "gate": "linear"}, {"gate": "linear"}),
    "gated_mlp_softmax1": ({"softmax": "softmax1", "gate": "mlp"}, {"softmax": "softmax1", "gate": "mlp"}),
    "gated_shared_linear": ({"softmax": "vanilla", "gate": "shared_linear"}, {"gate": "shared_linear"}),
}


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    init_model_parallel(1, 1, seed=1234)
    yield


def _arch():
    from megatron_outeff.models.hf_opt import arch_from_hf_config

    arch = arch_from_hf_config({"model_type": "opt", **TINY_350M}, name="opt-350m-tiny")
    assert (arch.embed_dim, arch.hidden_size, arch.do_layer_norm_before) == (32, 64, False)
    return arch


@pytest.mark.parametrize("name", list(VARIANTS))
def test_opt_350m_megatron_matches_oracle_and_round_trips(name):
    from megatron_outeff.models.hf_opt import (
        hf_state_dict_to_megatron,
        load_megatron_state_dict,
        megatron_to_hf_state_dict,
    )
    from megatron_outeff.models.opt import build_opt_model

    hf_fields, variant = VARIANTS[name]
    arch = _arch()
    opt_sd, extra = random_weights(hf_fields, seed=3, opt_kwargs=TINY_350M)
    hf_sd = {**opt_sd, **extra}
    model = build_opt_model(arch, variant).eval()
    names = set(model.state_dict())
    assert "embedding.word_embeddings.project_in.weight" in names and "output_layer.project_out.weight" in names
    assert "decoder.layers.1.post_mlp_layernorm.weight" in names and not any("final_layernorm" in k for k in names)
    load_megatron_state_dict(model, hf_state_dict_to_megatron(hf_sd, arch, variant=variant))
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(2, 250, (2, 12), generator=g)
    with torch.no_grad():
        got = model(tokens, torch.arange(12).expand(2, -1), None)[..., :250]
    ref = oracle_logits(hf_sd, hf_fields, tokens, torch.ones_like(tokens), opt_kwargs=TINY_350M)
    # float32 throughout: rounding only (DEPTH)
    torch.testing.assert_close(got, ref, rtol=0, atol=rounding_bound(torch.float32, ref.abs().max(), DEPTH))
    back = megatron_to_hf_state_dict({(0, 0): model.state_dict()}, arch, variant=variant)
    assert set(back) == set(hf_sd) | {"lm_head.weight"}
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)


def test_opt_350m_megatron_vanilla_matches_transformers_logits_and_grads():
    from transformers import OPTConfig, OPTForCausalLM

    from megatron_outeff.models.hf_opt import (
        hf_state_dict_to_megatron,
        load_megatron_state_dict,
        megatron_to_hf_state_dict,
    )
    from megatron_outeff.models.opt import build_opt_model

    arch = _arch()
    opt_sd, _ = random_weights({"softmax": "vanilla"}, seed=4, opt_kwargs=TINY_350M)
    cfg = OPTConfig(**TINY_350M)
    cfg._attn_implementation = "eager"
    hf = OPTForCausalLM(cfg)
    hf.load_state_dict(opt_sd, strict=False)  # lm_head is tied to embed_tokens
    hf.train()  # dropout 0: train mode only to mirror training
    model = build_opt_model(arch, None)
    load_megatron_state_dict(model, hf_state_dict_to_megatron(opt_sd, arch))
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(2, 250, (2, 12), generator=g)
    w = torch.randn(2, 12, 250, generator=g)
    ref = hf(tokens).logits
    (ref * w).sum().backward()
    got = model(tokens, torch.arange(12).expand(2, -1), None)[..., :250]
    (got * w).sum().backward()
    got, ref = got.detach(), ref.detach()
    torch.testing.assert_close(got, ref, rtol=0, atol=rounding_bound(torch.float32, ref.abs().max(), DEPTH))
    grads = megatron_to_hf_state_dict({(0, 0): {n: p.grad for n, p in model.named_parameters()}}, arch)
    for k, p in hf.named_parameters():
        if k.endswith("k_proj.bias") or k == "lm_head.weight":
            continue  # k bias: true gradient 0 (softmax shift invariance); lm_head is embed_tokens
        rel = float((grads[k] - p.grad).abs().max() / p.grad.abs().max())
        assert rel <= rounding_bound(torch.float32, 1.0, 2 * DEPTH), (k, rel)
    assert "model.decoder.project_in.weight" in grads and "model.decoder.project_out.weight" in grads


def test_opt_350m_outlier_components_hook_the_same_tensors_as_hf():
    """Training's outlier hooks (megatron names) and the HF report's hooks see identical activations on a
    post-LN model: attn_ln / ffn_ln are the post-residual LayerNorms on both sides, no final_ln."""
    from transformers import OPTConfig, OPTForCausalLM

    from megatron_outeff.metrics.outliers import hf_opt_components
    from megatron_outeff.models.hf_opt import hf_state_dict_to_megatron, load_megatron_state_dict
    from megatron_outeff.models.opt import build_opt_model
    from megatron_outeff.training.outliers import megatron_components

    arch = _arch()
    opt_sd, _ = random_weights({"softmax": "vanilla"}, seed=8, opt_kwargs=TINY_350M)
    cfg = OPTConfig(**TINY_350M)
    cfg._attn_implementation = "eager"
    hf = OPTForCausalLM(cfg).eval()
    hf.load_state_dict(opt_sd, strict=False)
    model = build_opt_model(arch, None).eval()
    load_megatron_state_dict(model, hf_state_dict_to_megatron(opt_sd, arch))
    mg_comps, hf_comps = megatron_components(model), hf_opt_components(hf)
    assert sorted(mg_comps) == sorted(hf_comps) and "final_ln" not in mg_comps
    seen = {}

    def hook(side, name):
        def fn(_m, _i, out):
            out = out[0] if isinstance(out, tuple) else out
            seen[(side, name)] = out.transpose(0, 1) if side == "mg" else out  # megatron is [s, b, h]

        return fn

    for side, comps in (("mg", mg_comps), ("hf", hf_comps)):
        for name, m in comps.items():
            if name.endswith(("attn_ln", "ffn_ln", ".layer")):
                m.register_forward_hook(hook(side, name))
    tokens = torch.randint(2, 250, (2, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        model(tokens, torch.arange(10).expand(2, -1), None)
        hf(tokens)
    names = sorted(n for s, n in seen if s == "hf")
    assert len(names) == 6
    for n in names:
        want = seen[("hf", n)].reshape(seen[("mg", n)].shape)
        torch.testing.assert_close(
            seen[("mg", n)], want, rtol=0, atol=rounding_bound(torch.float32, want.abs().max(), DEPTH)
        )


def test_full_size_opt_350m_builds_with_transformers_parameter_count():
    """configs/model/opt-350m.yaml builds (no refusal) into exactly the parameters of transformers'
    OPTForCausalLM with facebook/opt-350m's config (331,196,416, the LM head tied), same names/shapes mapped."""
    from transformers import OPTConfig, OPTForCausalLM

    from megatron_outeff.models.hf_opt import hf_config_dict, hf_state_dict_to_megatron
    from megatron_outeff.models.opt import build_opt_model, load_arch_config

    arch = load_arch_config("350m")
    model = build_opt_model(arch, perform_initialization=False)
    with torch.device("meta"):
        hf = OPTForCausalLM(OPTConfig(**hf_config_dict(arch)))
    hf_sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied (meta: no equality check)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters()) == 331_196_416
    mapped = hf_state_dict_to_megatron(hf_sd, arch)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert ours == {k: tuple(v.shape) for k, v in mapped.items()}
