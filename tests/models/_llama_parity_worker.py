"""torchrun worker (2 processes, gloo): parity of our megatron Llama with transformers' LlamaForCausalLM.

    torchrun --nproc_per_node 2 tests/models/_llama_parity_worker.py OUT.json

The reference is a random transformers LlamaForCausalLM with grouped-query attention (4 query heads,
2 key/value heads), every weight randomised (RMSNorm weights around 1), vocabulary 250 (padded at TP=2).
Its state dict is mapped into megatron (models/hf_llama.py) at TP=1 (megatron's own attention and
ours), TP=2, TP=2 + SP and PP=2; logits and gradients are compared with transformers', the mapping back
with the original tensors (torch.equal). Two attention variants (learnable offsets + per-head linear gates;
Softmax_1 + the elementwise gate, megatron-core's attention_output_gate rows in linear_qkv) are compared at
TP=2 (+SP) and PP=2 with our remote code (transformers' Llama with the variant's attention).
Negative controls show the comparison sees the two classic mistakes: the interleaved rotary
convention and a wrong query-head -> key/value-group assignment. Rank 0 writes JSON to argv[1].
"""

import sys
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from parity_testlib import local_grads, mismatched_keys, pipeline_forward, randomise_, write_merged

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hf"))
from hf_testlib import LLAMA31_ROPE_SCALING, TINY_LLAMA

from megatron_outeff.megatron.parallel import init_model_parallel
from megatron_outeff.models.hf_llama import (
    arch_from_hf_config,
    gather_megatron_state_dicts,
    hf_state_dict_to_megatron,
    load_megatron_state_dict,
    megatron_to_hf_state_dict,
)
from megatron_outeff.models.llama import build_llama_model

VOCAB, SEQ = 250, 24
# tests/hf's tiny Llama (hidden 64 in 4 query heads on 2 key/value heads, SwiGLU width 96, 2 layers, untied head)
# with no pad token (transformers would zero that embedding row's gradient; megatron's has no padding row)
HF_SHAPE = dict(TINY_LLAMA, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=None)


def make_hf(seed=0, **overrides):
    """A random transformers LlamaForCausalLM (eager attention): every weight randomised, so a swapped
    or dropped tensor cannot hide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**HF_SHAPE, **overrides})
    cfg._attn_implementation = "eager"
    return randomise_(LlamaForCausalLM(cfg).eval())


VARIANTS = {
    "variant": {"softmax": "learnable", "gate": "linear"},
    "elementwise": {"softmax": "softmax1", "gate": "elementwise"},
}


def variant_tensors(arch, variant, seed=11):
    """Random tensors of the variant (learnable offsets, per-head linear gates; the elementwise gate's
    gate_proj) in Hugging Face names, shaped by the variant's description (llama_variant_tensors)."""
    from megatron_outeff.models.hf_llama import variant_hf_shapes

    g = torch.Generator().manual_seed(seed)
    return {
        k: (2.0 if k.endswith("softmax_offset") else 0.3) * torch.randn(s, generator=g)
        for k, s in variant_hf_shapes(arch, variant).items()
    }


def main(out_json):
    from megatron_outeff.hf.configuration_outeff_llama import OutEffLlamaConfig
    from megatron_outeff.hf.modeling_outeff_llama import OutEffLlamaForCausalLM

    hf = make_hf()
    hf_sd = hf.state_dict()
    arch = arch_from_hf_config(hf.config.to_dict())
    extras, refs = {}, {}
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    for ref, fields in VARIANTS.items():  # references: our remote code, transformers' Llama with the variant
        extras[ref] = variant_tensors(arch, fields)
        vcfg = OutEffLlamaConfig(**{**hf.config.to_dict(), **fields})
        vcfg._attn_implementation = "eager"
        hf_var = OutEffLlamaForCausalLM(vcfg).eval()
        hf_var.load_state_dict({**hf_sd, **extras[ref]})
        with torch.no_grad():
            refs[ref] = hf_var(tokens).logits
    with torch.no_grad():
        refs["plain"] = hf(tokens).logits
    loss_w = torch.randn(refs["plain"].shape, generator=g)
    hf.zero_grad()
    (hf(tokens).logits * loss_w).sum().backward()
    ref_grads = {k: p.grad.clone() for k, p in hf.named_parameters()}
    res = {f"{ref}_changes_logits": float((refs["plain"] - refs[ref]).abs().max()) for ref in VARIANTS}

    def run(tag, tp, pp, sp=False, variant=None, ref="plain", grad_check=False, state=None, **overrides):
        init_model_parallel(tp, pp, seed=1)
        tpr, ppr = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        model = build_llama_model(arch, variant, sequence_parallel=sp, **overrides).eval()
        fields = VARIANTS.get(ref)
        full = state if state is not None else ({**hf_sd, **extras[ref]} if fields else hf_sd)
        load_megatron_state_dict(model, hf_state_dict_to_megatron(full, arch, tpr, tp, ppr, pp, variant=fields))
        with torch.no_grad():
            out = pipeline_forward(model, tokens, arch.hidden_size, pp)
        if out is not None:
            res[f"{tag}_max_abs_diff"] = float((out[..., :VOCAB] - refs[ref]).abs().max())
            res[f"{tag}_ref_max"] = float(refs[ref].abs().max())
            res[f"{tag}_padded_vocab"] = out.shape[-1]
        if grad_check:
            model.zero_grad()
            (pipeline_forward(model, tokens, arch.hidden_size, pp)[..., :VOCAB] * loss_w).sum().backward()
            mapped = megatron_to_hf_state_dict(gather_megatron_state_dicts(state_dict=local_grads(model, sp)), arch)
            res[f"{tag}_grad_rel_diff"] = max(
                float((mapped[k] - v).abs().max() / v.abs().max()) for k, v in ref_grads.items()
            )
        if state is None:
            back = megatron_to_hf_state_dict(gather_megatron_state_dicts(model), arch, variant=fields)
            want = {**hf_sd, **extras[ref]} if fields else hf_sd
            res[f"{tag}_export_bad"] = mismatched_keys(want, back)
        ps.destroy_model_parallel()

    run("tp1_megatron_attention", 1, 1, grad_check=True)  # megatron's own DotProductAttention
    run("tp1", 1, 1, variant={})  # our core attention, vanilla softmax
    run("tp2", 2, 1, variant={}, grad_check=True)
    run("tp2sp", 2, 1, sp=True, variant={}, grad_check=True)
    run("pp2", 1, 2, variant={})
    run("tp2_variant", 2, 1, variant=VARIANTS["variant"], ref="variant")
    run("pp2_variant", 1, 2, variant=VARIANTS["variant"], ref="variant")
    run("tp2sp_elementwise", 2, 1, sp=True, variant=VARIANTS["elementwise"], ref="elementwise")
    run("pp2_elementwise", 1, 2, variant=VARIANTS["elementwise"], ref="elementwise")
    # Negative controls: the same comparison with the other rotary convention, and with the query heads
    # assigned to the wrong key/value groups (head j -> group j % G instead of j // (H/G)).
    run("wrong_rotary_interleaved", 1, 1, variant={}, state=hf_sd, rotary_interleaved=True)
    H, G, d = arch.num_attention_heads, arch.query_groups, arch.head_dim
    perm = torch.arange(H).reshape(H // G, G).t().reshape(-1)  # [0, 2, 1, 3]: groups by j % G
    wrong = dict(hf_sd)
    for i in range(arch.num_layers):
        for name, dim in (("q_proj", 0), ("o_proj", 1)):
            k = f"model.layers.{i}.self_attn.{name}.weight"
            w = hf_sd[k] if dim == 0 else hf_sd[k].t()
            w = w.reshape(H, d, -1)[perm].reshape(H * d, -1)
            wrong[k] = w if dim == 0 else w.t().contiguous()
    run("wrong_gqa_grouping", 1, 1, variant={}, state=wrong)

    # Llama 3.1's "llama3" RoPE scaling (megatron's rope_scaling) at theta 5e5: head_dim 16 has
    # wavelengths beyond the 2048-token threshold, so the scaling changes the function.
    hf3 = make_hf(seed=3, rope_parameters={**LLAMA31_ROPE_SCALING, "rope_theta": 500000.0})
    arch3 = arch_from_hf_config(hf3.config.to_dict())
    res["llama3_rope_scaling_factor"] = arch3.rope_scaling_factor
    init_model_parallel(1, 1, seed=1)
    unscaled = arch3.__class__(**{**arch3.to_dict(), "rope_scaling_factor": None})
    for tag, a in (("llama3_rope", arch3), ("llama3_rope_unscaled", unscaled)):
        model = build_llama_model(a, {}).eval()
        load_megatron_state_dict(model, hf_state_dict_to_megatron(hf3.state_dict(), a))
        with torch.no_grad():
            ref3 = hf3(tokens).logits
            res[f"{tag}_max_abs_diff"] = float(
                (pipeline_forward(model, tokens, a.hidden_size, 1)[..., :VOCAB] - ref3).abs().max()
            )
            res[f"{tag}_ref_max"] = float(ref3.abs().max())
    ps.destroy_model_parallel()

    write_merged(res, out_json)


if __name__ == "__main__":
    main(sys.argv[1])
