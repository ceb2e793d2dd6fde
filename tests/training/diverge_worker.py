"""Run layouts that diverge at step 3 on one rank, in one torchrun job, and write what each rank saw.

    torchrun --nproc_per_node 2 tests/training/diverge_worker.py OUT.json CKPT_ROOT LAYOUT [LAYOUT ...]
LAYOUT: name:kind:rank:key=value,key=value (config overrides on top of train_testlib.BASE), kind "grad" or
"loss" (train_testlib.poison_hook), rank the one global rank whose gradient / loss turns NaN.
OUT.json: {name: [each rank's TrainingDiverged message, or null if it finished]}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.distributed as dist  # noqa: E402
from train_testlib import BASE, DEMO, finish_worker, poison_hook  # noqa: E402

from megatron_outeff.training.config import load_config  # noqa: E402
from megatron_outeff.training.step import TrainingDiverged  # noqa: E402
from megatron_outeff.training.train import train  # noqa: E402


def main():
    out, root, layouts = sys.argv[1], sys.argv[2], sys.argv[3:]
    results = {}
    for layout in layouts:
        name, kind, rank, sets = layout.split(":", 3)
        cfg = load_config(
            DEMO,
            BASE
            + [s for s in sets.split(",") if s]
            + [
                f"checkpoint.dir={root}/{name}",
                "checkpoint.save_interval=1",
                "checkpoint.keep_last=1",
                "train.train_iters=5",
            ],
        )
        micro = cfg.grad_accumulation_steps(int(os.environ["WORLD_SIZE"]))
        try:
            train(cfg, model_hook=poison_hook(3, micro, kind, ranks={int(rank)}))
            message = None
        except TrainingDiverged as e:
            message = str(e)
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, message)
        results[name] = messages
    finish_worker(out, results)


if __name__ == "__main__":
    main()
