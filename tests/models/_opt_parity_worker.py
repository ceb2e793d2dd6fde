"""torchrun worker (2 processes, gloo): imports a saved Hugging Face OPT into megatron at TP=1, TP=2
(+SP) and PP=2, compares logits with the HF model and exports back; then the same at TP=2 (+SP) and
PP=2 for an OPT-350m-shaped model (argv[4]: post-LN, project_in/out) with megatron's attention and
with the learnable-offset variant (reference: our remote-code OutEffOPTForCausalLM, i.e. transformers'
OPT with the variant's attention). Rank 0 writes JSON to argv[2]."""

import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from parity_testlib import local_grads, mismatched_keys, pipeline_forward, positions, write_merged

from megatron_outeff.megatron.parallel import init_model_parallel
from megatron_outeff.models.hf_opt import (
    gather_megatron_state_dicts,
    hf_state_dict_to_megatron,
    load_hf_opt_dir,
    load_megatron_state_dict,
    megatron_to_hf_state_dict,
    save_hf_opt_dir,
)
from megatron_outeff.models.opt import build_opt_model


def _variant(softmax):
    """The AttentionVariantConfig of a softmax name (None: plain OPT, no variant tensors)."""
    from megatron_outeff.ops.variants import AttentionVariantConfig

    return None if softmax is None else AttentionVariantConfig(softmax=softmax)


def load_reference(hf_dir: str):
    """(arch without dropout, HF state dict, transformers' OPTForCausalLM in eval mode) of a saved OPT."""
    from transformers import OPTForCausalLM

    arch, hf_sd = load_hf_opt_dir(hf_dir)
    arch.hidden_dropout = arch.attention_dropout = 0.0
    return arch, hf_sd, OPTForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()


def hf_reference_grads(hf, tokens, loss_w) -> dict:
    """{name: grad} of sum(logits * loss_w) for the HF model (lm_head is the embedding)."""
    hf.zero_grad()
    (hf(tokens).logits * loss_w).sum().backward()
    return {k: p.grad.clone() for k, p in hf.named_parameters()}


def grad_check_into(res, tag, model, arch, tokens, loss_w, ref_grads, sp):
    """Same scalar loss on both sides; the megatron gradients, mapped to HF layout by the same
    converter, must equal HF's. Under SP the LayerNorm (and project_out) grads are partial sums per
    rank: all-reduce those marked sequence_parallel, as megatron's finalize_model_grads does.
    Returns the logits (TP=1 pipeline only)."""
    model.zero_grad()
    out = model(tokens, positions(tokens), None, runtime_gather_output=True)
    (out[..., : arch.vocab_size].float() * loss_w).sum().backward()
    hf_grads = megatron_to_hf_state_dict(gather_megatron_state_dicts(state_dict=local_grads(model, sp)), arch)
    # k_proj biases have an exactly-zero true gradient (softmax is shift-invariant): both sides
    # hold rounding noise there, checked against the largest gradient anywhere instead.
    top = max(float(v.abs().max()) for v in ref_grads.values())
    kb = [k for k in ref_grads if k.endswith("k_proj.bias")]
    diffs = sorted(
        (
            (float((hf_grads[k] - ref_grads[k]).abs().max() / ref_grads[k].abs().max()), k)
            for k in ref_grads
            if k not in kb
        ),
        reverse=True,
    )
    res[f"{tag}_grad_rel_diff"] = diffs[0][0]
    res[f"{tag}_grad_worst_keys"] = diffs[:3]
    res[f"{tag}_k_bias_grad_rel"] = max(float(hf_grads[k].abs().max()) for k in kb) / top
    return out


def opt_350m_runs(hf_dir: str, res: dict) -> None:
    from megatron_outeff.hf import OutEffOPTConfig, OutEffOPTForCausalLM

    arch, hf_sd, hf = load_reference(hf_dir)
    # The learnable-offset variant: the same weights plus random per-head offsets (sharded by head at TP=2).
    g = torch.Generator().manual_seed(11)
    offsets = {
        f"model.decoder.layers.{i}.self_attn.softmax_offset": 2.0 * torch.randn(arch.num_attention_heads, generator=g)
        for i in range(arch.num_layers)
    }
    cfg = OutEffOPTConfig(**{**hf.config.to_dict(), "softmax": "learnable"})
    cfg._attn_implementation = "eager"
    ref_var = OutEffOPTForCausalLM(cfg).eval()
    ref_var.load_state_dict({**hf_sd, **offsets}, strict=False)  # lm_head tied
    tokens = torch.randint(2, arch.vocab_size, (2, 20), generator=g)
    with torch.no_grad():
        refs = {None: hf(tokens).logits, "learnable": ref_var(tokens).logits}
    res["opt_350m_variant_changes_logits"] = float((refs[None] - refs["learnable"]).abs().max())
    loss_w = torch.randn(refs[None].shape, generator=g)
    ref_grads = hf_reference_grads(hf, tokens, loss_w)
    full = {None: hf_sd, "learnable": {**hf_sd, **offsets}}
    for tag, tp, pp, sp, variant in [
        ("tp2", 2, 1, False, None),
        ("tp2sp", 2, 1, True, None),
        ("pp2", 1, 2, False, None),
        ("tp2_learnable", 2, 1, False, "learnable"),
        ("pp2_learnable", 1, 2, False, "learnable"),
    ]:
        init_model_parallel(tp, pp, seed=1)
        tpr, ppr = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        model = build_opt_model(arch, variant and {"softmax": variant}, sequence_parallel=sp).eval()
        load_megatron_state_dict(
            model, hf_state_dict_to_megatron(full[variant], arch, tpr, tp, ppr, pp, variant=_variant(variant))
        )
        with torch.no_grad():
            out = pipeline_forward(model, tokens, arch.hidden_size, pp)
        if tag == "tp2sp":  # replicated project_in/out: grads equal on every rank, project_out's SP-reduced
            grad_check_into(res, f"opt_350m_{tag}", model, arch, tokens, loss_w, ref_grads, sp)
        if out is not None:
            res[f"opt_350m_{tag}_max_abs_diff"] = float((out[..., : arch.vocab_size] - refs[variant]).abs().max())
            res[f"opt_350m_{tag}_ref_max"] = float(refs[variant].abs().max())
        back = megatron_to_hf_state_dict(gather_megatron_state_dicts(model), arch, variant=_variant(variant))
        want = {**full[variant], "lm_head.weight": hf_sd["model.decoder.embed_tokens.weight"]}
        res[f"opt_350m_{tag}_export_bad"] = mismatched_keys(want, back)
        ps.destroy_model_parallel()


def main(hf_dir: str, out_json: str, export_dir: str, hf_350m_dir: str) -> None:
    arch, hf_sd, hf = load_reference(hf_dir)
    ref_sd = hf.state_dict()
    g = torch.Generator().manual_seed(7)
    # No pad token (id 1) in the input: HF's embed_tokens has padding_idx=1, which zeroes that row's
    # lookup gradient; megatron's embedding has no padding row (forward is identical either way).
    tokens = torch.randint(2, arch.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        ref = hf(tokens).logits
    V = arch.vocab_size
    res = {}

    def exported_equal(hf_out):
        bad = [k for k in ref_sd if k not in hf_out or not torch.equal(hf_out[k], ref_sd[k])]
        return {
            "n_keys": len(hf_out),
            "n_ref": len(ref_sd),
            "bad": bad[:5],
            "extra": sorted(set(hf_out) - set(ref_sd))[:5],
        }

    loss_w = torch.randn(ref.shape, generator=g)
    ref_grads = hf_reference_grads(hf, tokens, loss_w)

    def run(tag, tp, pp, sp=False, variant=None, allow_missing=(), dtype=torch.float32, grad_check=False):
        init_model_parallel(tp, pp, seed=1)
        tpr, ppr = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
        model = build_opt_model(arch, variant, sequence_parallel=sp, params_dtype=dtype).eval()
        load_megatron_state_dict(model, hf_state_dict_to_megatron(hf_sd, arch, tpr, tp, ppr, pp), allow_missing)
        with torch.no_grad():
            out = pipeline_forward(model, tokens, arch.hidden_size, pp)
        if grad_check:
            out = grad_check_into(res, tag, model, arch, tokens, loss_w, ref_grads, sp)
        if out is not None:
            res[f"{tag}_logits_shape"] = list(out.shape)
            res[f"{tag}_max_abs_diff"] = float((out[..., :V].float() - ref).abs().max())
            res[f"{tag}_logits_max"] = float(ref.abs().max())  # the magnitude of the derived bound
            res[f"{tag}_rel_diff"] = float((out[..., :V].float() - ref).norm() / ref.norm())
        gathered = gather_megatron_state_dicts(model)
        if allow_missing:
            # Variant parameters have no Hugging Face OPT counterpart: strict export refuses them.
            try:
                megatron_to_hf_state_dict(gathered, arch)
                res[f"{tag}_strict_error"] = None
            except ValueError as e:
                res[f"{tag}_strict_error"] = str(e)
        if dtype != torch.float32:
            return ps.destroy_model_parallel()
        res[f"{tag}_export"] = exported_equal(megatron_to_hf_state_dict(gathered, arch, strict=not allow_missing))
        if tag == "tp2" and dist.get_rank() == 0:
            save_hf_opt_dir(export_dir, arch, megatron_to_hf_state_dict(gathered, arch))
        ps.destroy_model_parallel()

    run("tp1", 1, 1, grad_check=True)
    run("tp2", 2, 1, grad_check=True)
    run("tp2sp", 2, 1, sp=True, grad_check=True)
    run("pp2", 1, 2)
    run("tp2bf16", 2, 1, dtype=torch.bfloat16)  # a bare bf16 model (no Float16Module) runs

    # The live-model conveniences: directory -> model, model -> HF state dict (PP=2 here).
    from megatron_outeff.models.hf_opt import load_hf_opt_into_model, megatron_model_to_hf_state_dict

    init_model_parallel(1, 2, seed=3)
    model = build_opt_model(arch, dict(softmax="learnable"))
    load_hf_opt_into_model(model, hf_dir, arch)
    res["convenience_export"] = exported_equal(megatron_model_to_hf_state_dict(model, arch, strict=False))
    ps.destroy_model_parallel()
    # megatron_outeff's attention (layer spec from wt/mcore) with the vanilla variant == HF OPT.
    run("tp2_outeff_vanilla", 2, 1, variant={})
    # A gated Softmax_1 model still takes every OPT weight; its gates stay at their init.
    run("tp2_gated_sm1", 2, 1, variant=dict(softmax="softmax1", gate="linear"), allow_missing=(r"head_gate\.",))
    opt_350m_runs(hf_350m_dir, res)
    write_merged(res, out_json)


if __name__ == "__main__":
    main(*sys.argv[1:5])
