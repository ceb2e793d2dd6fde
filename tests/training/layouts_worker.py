"""Run several parallel layouts in one torchrun job and write each one's loss curve to JSON.

    torchrun --nproc_per_node N tests/training/layouts_worker.py OUT.json LAYOUT [LAYOUT ...]
LAYOUT: name:key=value,key=value (config overrides on top of common.BASE), e.g. "zero2:parallel.zero_stage=2".
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch.distributed as dist  # noqa: E402

from common import BASE, DEMO  # noqa: E402
from megatron_outeff.training.config import load_config  # noqa: E402
from megatron_outeff.training.train import train  # noqa: E402


def main():
    out, layouts = sys.argv[1], sys.argv[2:]
    results = {}
    for layout in layouts:
        name, _, sets = layout.partition(":")
        cfg = load_config(DEMO, BASE + [s for s in sets.split(",") if s])
        results[name] = [loss for _, loss in train(cfg)["history"]]
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
