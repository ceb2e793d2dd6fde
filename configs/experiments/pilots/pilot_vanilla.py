# usage (repo root): PYTHONPATH=$PWD OMP_NUM_THREADS=1 python configs/experiments/pilots/pilot_vanilla.py STEPS OUT_DIR
# Vanilla-only full-length pilot through the runner's own run_one (train + evaluation): the positive
# control's values (MA, E, idle mass) and the pipeline control's A4 increase at the chosen length.
import sys
from pathlib import Path

import torch
import yaml

from megatron_outeff.evaluation.experiment import claim_out_dir, experiment_from_dict, run_one

steps = int(sys.argv[1])
out = Path(sys.argv[2])
data = yaml.safe_load(Path("configs/experiments/bb-massive-cpu.yaml").read_text())
data["training"]["train"]["train_iters"] = steps
data["seeds"] = [1234]
exp = experiment_from_dict(data)
claim_out_dir(out, exp)
run = next(r for r in exp.runs() if r.arm == "vanilla_adamw")
torch.set_num_threads(1)
run_one(exp, run, out, log=lambda s: print(s, flush=True))
