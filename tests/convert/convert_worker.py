"""One torchrun job (2 processes) producing everything the conversion tests check.

    torchrun --nproc_per_node 2 tests/convert/convert_worker.py OUT_DIR

1. ``src``: TP=2 ZeRO-1, learnable offsets + linear gates, 2 steps -> OUT/src (training checkpoint).
2. ``z3``: DP=2 ZeRO-3, Softmax_1 + mlp gates, 1 step -> OUT/z3; the same under ZeRO-0 -> OUT/z0.
3. rank 0: reshard OUT/src -> OUT/r_tp1 (TP=1) and OUT/r_pp2 (PP=2).
4. three new runs, 1 step each, start from those weights (checkpoint.init_from): TP=2 from OUT/src,
   TP=1 x DP=2 from OUT/r_tp1, PP=2 from OUT/r_pp2 (saving OUT/pp2): their first losses go to
   OUT/results.json.
5. megatron logits of OUT/r_tp1 at TP=1 on fixed tokens -> OUT/megatron_logits.safetensors.
6. bf16 (fp32 master weights): DP=2 ZeRO-1 (3 steps) -> OUT/bf16_z1, DP=2 ZeRO-3 -> OUT/bf16_z3,
   TP=2 ZeRO-2 -> OUT/bf16_tp2, PP=2 ZeRO-0 -> OUT/bf16_pp2; then OUT/bf16_z1 loaded with init_from's
   loader into an fp32 TP=1 model -> OUT/init_from_bf16_z1.safetensors (its state dict).
7. OPT-350m's shape in miniature (post-LN, 32-wide embeddings projected to 64): bf16 DP=2 ZeRO-1 ->
   OUT/opt_350m_bf16_z1, fp32 TP=2 ZeRO-1 -> OUT/opt_350m_tp2, fp32 PP=2 -> OUT/opt_350m_pp2; the
   megatron logits of OUT/opt_350m_bf16_z1 at TP=1 -> OUT/opt_350m_logits.safetensors.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "training"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from train_testlib import BASE, DEMO, megatron_model_tp1  # noqa: E402

from megatron_outeff.training.config import load_config  # noqa: E402
from megatron_outeff.training.train import train  # noqa: E402

VARIANT = "attention={softmax: learnable, gate: linear}"
Z3_VARIANT = "attention={softmax: softmax1, gate: mlp}"
OPT_350M = (
    "model.arch_overrides={vocab_size: 256, hidden_dropout: 0.0, attention_dropout: 0.0, "
    "do_layer_norm_before: false, word_embed_proj_dim: 32}"
)


def tokens():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (2, 16), generator=g)


def run(sets):
    cfg = load_config(DEMO, BASE + sets)
    return [loss for _, loss in train(cfg)["history"]]


def main():
    out = Path(sys.argv[1])
    results = {}
    results["src"] = run(
        [
            VARIANT,
            "parallel.tensor_parallel=2",
            "parallel.zero_stage=1",
            "train.train_iters=2",
            f"checkpoint.dir={out / 'src'}",
        ]
    )
    results["z3"] = run([Z3_VARIANT, "parallel.zero_stage=3", "train.train_iters=1", f"checkpoint.dir={out / 'z3'}"])
    results["z0"] = run([Z3_VARIANT, "parallel.zero_stage=0", "train.train_iters=1", f"checkpoint.dir={out / 'z0'}"])
    if dist.get_rank() == 0:
        from megatron_outeff.convert import reshard

        reshard(out / "src", out / "r_tp1", tp=1, pp=1)
        reshard(out / "src", out / "r_pp2", tp=1, pp=2)
    dist.barrier()
    one = ["train.train_iters=1", "schedule.warmup_iters=0"]
    results["init_src_tp2"] = run([VARIANT, "parallel.tensor_parallel=2", f"checkpoint.init_from={out / 'src'}"] + one)
    results["init_pp2"] = run(
        [
            VARIANT,
            "parallel.pipeline_parallel=2",
            f"checkpoint.init_from={out / 'r_pp2'}",
            f"checkpoint.dir={out / 'pp2'}",
        ]
        + one
    )
    results["init_tp1_dp2"] = run([VARIANT, f"checkpoint.init_from={out / 'r_tp1'}"] + one)
    bf16 = [VARIANT, "precision.dtype=bf16", "optimizer.lr=0.003", "train.train_iters=2"]
    run(bf16 + [OPT_350M, "parallel.zero_stage=1", f"checkpoint.dir={out / 'opt_350m_bf16_z1'}"])
    results["opt_350m_tp2"] = run(
        [
            VARIANT,
            OPT_350M,
            "parallel.tensor_parallel=2",
            "parallel.zero_stage=1",
            f"checkpoint.dir={out / 'opt_350m_tp2'}",
        ]
    )
    results["opt_350m_pp2"] = run(
        [VARIANT, OPT_350M, "parallel.pipeline_parallel=2", f"checkpoint.dir={out / 'opt_350m_pp2'}"]
    )
    run(bf16 + ["parallel.tensor_parallel=2", "parallel.zero_stage=2", f"checkpoint.dir={out / 'bf16_tp2'}"])
    run(bf16 + ["parallel.pipeline_parallel=2", "parallel.zero_stage=0", f"checkpoint.dir={out / 'bf16_pp2'}"])
    run(bf16 + ["parallel.zero_stage=3", f"checkpoint.dir={out / 'bf16_z3'}"])
    run(bf16 + ["parallel.zero_stage=1", "train.train_iters=3", f"checkpoint.dir={out / 'bf16_z1'}"])

    # megatron logits at TP=1 (parallel state of the last run: TP=1, PP=1, DP=2)
    from megatron.core import parallel_state as ps

    cfg = load_config(DEMO, BASE + [VARIANT])
    assert ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1
    model = megatron_model_tp1(cfg, out / "r_tp1")
    ids = tokens()
    bf16_model = megatron_model_tp1(cfg, out / "bf16_z1")
    model_350m = megatron_model_tp1(load_config(DEMO, BASE + [VARIANT, OPT_350M]), out / "opt_350m_bf16_z1")
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
        logits_350m = model_350m(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        save_file({"tokens": ids, "logits": logits_350m.float().contiguous()}, str(out / "opt_350m_logits.safetensors"))
        save_file({"tokens": ids, "logits": logits.float().contiguous()}, str(out / "megatron_logits.safetensors"))
        save_file(
            {
                k: v.contiguous()
                for k, v in bf16_model.state_dict().items()
                if isinstance(v, torch.Tensor) and not k.endswith("_extra_state")
            },
            str(out / "init_from_bf16_z1.safetensors"),
        )
        (out / "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
