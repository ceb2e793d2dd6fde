"""One torchrun job (2 processes) producing everything the Llama training tests check.

    torchrun --nproc_per_node 2 tests/training/llama_worker.py OUT_DIR

A tiny Llama (configs/model/llama-tiny.yaml on train_testlib.BASE: vocabulary 256, no dropout, fp32,
4 steps of global batch 4):
1. ``ref_gated`` (Softmax_1 + per-head linear gates), ``ref_vanilla`` and ``ref_elementwise`` (Softmax_1 + the
   elementwise output gate) at DP=2 ZeRO-0, the oracles; each saves its initial weights (OUT/w_<variant>.pt;
   TP=1, so rank 0 holds the full model).
2. ``tp2``: TP=2 ZeRO-1, gated, stopped after 2 steps (exit_interval) and resumed to 4 -> OUT/tp2
   (with TensorBoard in OUT/tb_tp2 and the outlier probe every 2 steps); ``tp2_sp_zero2``: TP=2 + SP under
   ZeRO-2, 4 steps; ``tp2_bf16``: TP=2 in bf16 (ZeRO-1); ``pp2``: PP=2 ZeRO-1, vanilla, stopped after 2 and
   resumed -> OUT/pp2;
   ``tp2_elementwise``: TP=2 ZeRO-1 -> OUT/tp2_elementwise; ``dp2_zero3``: DP=2 ZeRO-3, gated; ``tp2_to_pp2``: the TP=2 checkpoint at step 2 resumed at PP=2 (elastic:
   another layout, from our model and optimizer files). The TP / PP layouts start from the oracle's
   initial weights.
3. megatron logits at TP=1 of OUT/tp2, OUT/pp2 and OUT/tp2_elementwise (merged with the model files' own rules) on fixed tokens
   -> OUT/megatron_logits.safetensors. Losses -> OUT/losses.json.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from layouts_worker import weights_hook  # noqa: E402
from train_testlib import BASE, DEMO, megatron_model_tp1  # noqa: E402

from megatron_outeff.training.config import load_config  # noqa: E402
from megatron_outeff.training.model import unwrap  # noqa: E402
from megatron_outeff.training.train import train  # noqa: E402

LLAMA = ["model.arch=llama-tiny"]
VARIANTS = {
    "gated": "attention={softmax: softmax1, gate: linear}",
    "vanilla": "attention={softmax: vanilla}",
    "elementwise": "attention={softmax: softmax1, gate: elementwise}",
}


def tokens():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(7))


def save_hook(path):
    """Rank 0 of a TP=1, PP=1 layout saves its (full) initial weights."""

    def hook(model):
        if dist.get_rank() == 0:
            torch.save({k: v.clone() for k, v in unwrap(model).state_dict().items() if torch.is_tensor(v)}, path)
        dist.barrier()

    return hook


def run(variant, sets, hook=None):
    cfg = load_config(DEMO, BASE + LLAMA + [VARIANTS[variant]] + sets)
    return [loss for _, loss in train(cfg, model_hook=hook)["history"]]


def main():
    out = Path(sys.argv[1])
    w = {v: str(out / f"w_{v}.pt") for v in VARIANTS}
    losses = {}
    losses["ref_gated"] = run("gated", [], save_hook(w["gated"]))
    tp2 = [
        "parallel.tensor_parallel=2",
        "parallel.zero_stage=1",
        f"checkpoint.dir={out / 'tp2'}",
        f"logging.tensorboard_dir={out / 'tb_tp2'}",
        "logging.outlier_interval=2",
    ]
    losses["tp2"] = run("gated", tp2 + ["train.exit_interval=2"], weights_hook(w["gated"]))
    if dist.get_rank() == 0:  # the step-2 checkpoint, to resume on another layout below
        import shutil

        shutil.copytree(out / "tp2", out / "tp2_to_pp2")
    dist.barrier()
    losses["tp2"] += run("gated", tp2, weights_hook(w["gated"]))  # resumes from iteration 2
    losses["tp2_sp_zero2"] = run(
        "gated",
        ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "parallel.zero_stage=2"],
        weights_hook(w["gated"]),
    )
    losses["tp2_bf16"] = run(
        "gated",
        ["parallel.tensor_parallel=2", "parallel.zero_stage=1", "precision.dtype=bf16"],
        weights_hook(w["gated"]),
    )  # llama-125m.yaml's precision
    losses["ref_vanilla"] = run("vanilla", [], save_hook(w["vanilla"]))
    pp2 = ["parallel.pipeline_parallel=2", "parallel.zero_stage=1", f"checkpoint.dir={out / 'pp2'}"]
    losses["pp2"] = run("vanilla", pp2 + ["train.exit_interval=2"], weights_hook(w["vanilla"]))
    losses["pp2"] += run("vanilla", pp2, weights_hook(w["vanilla"]))
    losses["tp2_to_pp2"] = run(
        "gated", ["parallel.pipeline_parallel=2", "parallel.zero_stage=1", f"checkpoint.dir={out / 'tp2_to_pp2'}"]
    )  # steps 3 and 4
    losses["ref_elementwise"] = run("elementwise", [], save_hook(w["elementwise"]))
    losses["tp2_elementwise"] = run(
        "elementwise",
        ["parallel.tensor_parallel=2", "parallel.zero_stage=1", f"checkpoint.dir={out / 'tp2_elementwise'}"],
        weights_hook(w["elementwise"]),
    )
    losses["dp2_zero3"] = run("gated", ["parallel.zero_stage=3"])  # TP=1: the oracle's initial weights by construction

    # megatron logits at TP=1 (the last run's parallel state: TP=1, PP=1, DP=2) of the two checkpoints
    from megatron.core import parallel_state as ps

    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1
    ids, logits = tokens(), {}
    for name, variant in (("tp2", "gated"), ("pp2", "vanilla"), ("tp2_elementwise", "elementwise")):
        model = megatron_model_tp1(load_config(DEMO, BASE + LLAMA + [VARIANTS[variant]]), out / name)
        with torch.no_grad():
            logits[name] = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None).float().contiguous()
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        save_file({"tokens": ids, **logits}, str(out / "megatron_logits.safetensors"))
        (out / "losses.json").write_text(json.dumps(losses))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
