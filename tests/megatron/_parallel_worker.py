"""torchrun worker (2 processes, gloo): every attention variant under every parallel layout vs TP=1.

For each variant, first a TP=1 reference (both ranks compute it; DP=2 with no gradient sync),
then TP=2, TP=2 + sequence parallel, and PP=2 (2 microbatches through megatron's schedule). All
runs see the same two microbatches and the same weights:
  * TP layouts: built with use_cpu_initialization=True and the same seed; the worker CHECKS that
    every TP shard is the exact slice of the TP=1 tensor (gate and offset included).
  * PP: each stage builds only its layers, so its weights are copied from the TP=1 model.
Loss and gradients (gathered to full shapes) are compared with the TP=1 run. Finally a TP=2
dist_checkpointing save is reloaded at TP=1 (sharded_state_dict of the offset and gate).

Usage: torchrun --nproc_per_node 2 tests/megatron/_parallel_worker.py OUT.json
Rank 0 writes {layout: {variant: {...max abs diffs...}}}.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
from megatron_testlib import SEQ, VOCAB, gpt, tiny_config

SEED, MB, NUM_MB = 1234, 2, 2

VARIANTS = {
    "vanilla": dict(),
    "softmax1": dict(softmax="softmax1"),
    "learnable": dict(softmax="learnable"),
    "clipped": dict(clip_gamma=-0.03, clip_zeta=1.0),
    "clipped_softmax1": dict(softmax="softmax1", clip_gamma=-0.03, clip_zeta=1.0),
    "gated": dict(gate="linear"),
    "gated_softmax1": dict(softmax="softmax1", gate="linear"),
    "gated_mlp_learnable": dict(softmax="learnable", gate="mlp"),
    "gated_shared_softmax_n": dict(softmax="softmax_n", softmax_n=2.0, gate="shared_linear"),
    "gqa_gated_learnable": dict(softmax="learnable", gate="linear"),
    "elementwise_softmax1": dict(softmax="softmax1", gate="elementwise"),
    "elementwise_clipped_learnable": dict(softmax="learnable", gate="elementwise", clip_gamma=-0.03, clip_zeta=1.0),
    "gqa_elementwise_softmax_n": dict(softmax="softmax_n", softmax_n=2.0, gate="elementwise"),
}
# 2 KV groups, 4 query heads
CONFIG_OVERRIDES = {
    "gqa_gated_learnable": dict(num_query_groups=2),
    "gqa_elementwise_softmax_n": dict(num_query_groups=2),
}
LAYOUTS = {"tp2": (2, 1, False), "tp2_sp": (2, 1, True), "pp2": (1, 2, False)}
# Also through megatron's own DistributedDataParallel + finalize_model_grads at TP=2 + SP: megatron's
# machinery (not this worker) reduces the SP norm grads and leaves TP-sharded gate/offset grads alone.
DDP_VARIANTS = ("learnable", "gated_softmax1", "gated_mlp_learnable", "elementwise_clipped_learnable")
CHECKPOINT_VARIANTS = ("learnable", "gated_mlp_learnable", "gated_softmax1", "elementwise_clipped_learnable")


def build(vname, sp):
    """The variant's tiny GPT at the layout of megatron's parallel state (init_model_parallel comes first)."""
    from megatron.core import parallel_state as ps

    from megatron_outeff.megatron.layer_spec import get_outeff_block_spec
    from megatron_outeff.megatron.variant import AttentionVariantConfig

    variant = AttentionVariantConfig(**VARIANTS[vname])
    cfg = tiny_config(variant, sequence_parallel=sp, **CONFIG_OVERRIDES.get(vname, {}))
    return gpt(
        cfg,
        get_outeff_block_spec(cfg, variant),
        seed=SEED,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )


def batches():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (MB, SEQ), generator=g) for _ in range(NUM_MB)]


def run_step(model):
    """Forward + backward of NUM_MB microbatches through megatron's schedule; mean loss (all ranks).

    ``model`` may be wrapped in megatron's DistributedDataParallel (grads land in ``main_grad``).
    """
    from megatron.core import parallel_state as ps

    from megatron_outeff.megatron.cpu_support import cpu_safe_forward_backward_func

    def forward_step(data_iterator, model):
        ids = next(data_iterator)
        pos = torch.arange(SEQ).expand_as(ids)
        out = model(ids, pos, None, labels=ids)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    if hasattr(model, "zero_grad_buffer"):
        model.zero_grad_buffer()
    else:
        model.zero_grad(set_to_none=True)
    schedule = cpu_safe_forward_backward_func()
    losses = schedule(
        forward_step_func=forward_step,
        data_iterator=iter(batches()),
        model=[model],
        num_microbatches=NUM_MB,
        seq_length=SEQ,
        micro_batch_size=MB,
        forward_only=False,
    )
    local = [float(d["loss"]) for d in losses] if ps.is_pipeline_last_stage() else None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    values = next(v for v in gathered if v is not None)
    return sum(values) / len(values)


def global_name(model, name):
    """'decoder.layers.{i}.' -> the global layer index (pipeline stages number layers locally)."""
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if not m:
        return name
    layer = model.decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"


def gather_full(model, tensors, sp):
    """{global name: full tensor}: TP shards concatenated, SP partial grads summed, PP stages merged."""
    from megatron.core import parallel_state as ps

    tp_group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    out = {}
    for name, p in model.named_parameters():
        t = tensors(p)
        if t is None:
            continue
        t = t.detach().clone()
        if sp and getattr(p, "sequence_parallel", False):
            dist.all_reduce(t, group=tp_group)
        if tp > 1 and getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=tp_group)
            t = torch.cat(parts, dim=p.partition_dim)
        out[global_name(model, name)] = t
    merged = [None] * dist.get_world_size()
    dist.all_gather_object(merged, out)
    full = {}
    for d in merged:
        full.update(d)
    return full


def max_diff(a, b):
    keys = set(a) | set(b)
    missing = sorted(k for k in keys if k not in a or k not in b)
    if missing:
        return float("inf"), f"missing {missing[:3]}"
    worst, where = 0.0, ""
    for k in sorted(keys):
        if a[k].shape != b[k].shape:
            return float("inf"), f"{k}: shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        d = (a[k].float() - b[k].float()).abs().max().item()
        if d > worst:
            worst, where = d, k
    return worst, where


def copy_from_reference(model, ref_weights):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ref_weights[global_name(model, name)])


def init_slice_diff(model, ref_weights):
    """Max |shard - slice of the TP=1 tensor| over all parameters (0 means exact slices)."""
    from megatron.core import parallel_state as ps

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    worst = 0.0
    for name, p in model.named_parameters():
        ref = ref_weights[global_name(model, name)]
        if getattr(p, "tensor_model_parallel", False) and tp > 1:
            ref = ref.chunk(tp, dim=p.partition_dim)[rank]
        worst = max(worst, (p.detach() - ref).abs().max().item())
    return worst


def ddp_entry(vname, ref_loss, ref_grads):
    """TP=2 + SP under megatron's DistributedDataParallel with finalize_model_grads."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_outeff.megatron.parallel import init_model_parallel

    init_model_parallel(2, 1, seed=SEED)
    model = build(vname, True)
    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    loss = run_step(ddp)
    grads = gather_full(model, lambda p: p.main_grad, False)  # SP reduction already done by megatron
    diff, worst = max_diff(grads, ref_grads)
    return {"loss_diff": abs(loss - ref_loss), "grad_diff": diff, "grad_worst": worst, "num_grads": len(grads)}


def checkpoint_roundtrip(results, tp2_models, ckpt_dir):
    """dist_checkpointing: save the TP=2 models, load them at TP=1, compare with the gathered weights."""
    from megatron.core import dist_checkpointing

    from megatron_outeff.megatron.parallel import init_model_parallel

    for key, (model, full_weights) in tp2_models.items():
        init_model_parallel(2, 1, seed=SEED)
        path = os.path.join(ckpt_dir, key)
        if dist.get_rank() == 0:
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), path)
        init_model_parallel(1, 1, seed=SEED)
        fresh = build(key, False)
        with torch.no_grad():  # the same seed would already give the same weights: start from zeros
            for p in fresh.parameters():
                p.zero_()
        loaded = dist_checkpointing.load(fresh.sharded_state_dict(), path)
        fresh.load_state_dict(loaded, strict=False)
        got = {n: p.detach() for n, p in fresh.named_parameters()}
        d, where = max_diff(got, full_weights)
        results.setdefault("ckpt_tp2_to_tp1", {})[key] = {"weight_diff": d, "where": where}


def main():
    out_path = sys.argv[1]
    from megatron_outeff.megatron.parallel import init_model_parallel

    t0 = time.time()
    results = {"errors": []}
    tp2_models = {}
    for vname in VARIANTS:
        try:
            init_model_parallel(1, 1, seed=SEED)
            ref = build(vname, False)
            ref_weights = {n: p.detach().clone() for n, p in ref.named_parameters()}
            ref_loss = run_step(ref)
            ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters() if p.grad is not None}
            results.setdefault("tp1", {})[vname] = {
                "loss": ref_loss,
                "num_grads": len(ref_grads),
                "grad_max": max(float(g.abs().max()) for g in ref_grads.values()),
            }
            for lname, (tp, pp, sp) in LAYOUTS.items():
                init_model_parallel(tp, pp, seed=SEED)
                model = build(vname, sp)
                entry = {}
                if pp == 1:
                    entry["init_slice_diff"] = init_slice_diff(model, ref_weights)
                else:
                    copy_from_reference(model, ref_weights)
                loss = run_step(model)
                grads = gather_full(model, lambda p: p.grad, sp)
                entry["loss_diff"] = abs(loss - ref_loss)
                entry["grad_diff"], entry["grad_worst"] = max_diff(grads, ref_grads)
                entry["num_grads"] = len(grads)
                results.setdefault(lname, {})[vname] = entry
                if lname == "tp2" and vname in CHECKPOINT_VARIANTS:
                    tp2_models[vname] = (model, gather_full(model, lambda p: p, False))
            if vname in DDP_VARIANTS:
                results.setdefault("tp2_sp_megatron_ddp", {})[vname] = ddp_entry(vname, ref_loss, ref_grads)
        except Exception:
            results["errors"].append(f"{vname}: {traceback.format_exc()}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shared = [tmp]
            dist.broadcast_object_list(shared, src=0)
            checkpoint_roundtrip(results, tp2_models, shared[0])
            dist.barrier()
    except Exception:
        results["errors"].append(f"checkpoint: {traceback.format_exc()}")
    results["seconds"] = time.time() - t0
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
