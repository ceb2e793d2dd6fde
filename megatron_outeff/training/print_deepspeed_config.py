"""Print the DeepSpeed JSON a training config generates: python -m megatron_outeff.training.print_deepspeed_config --config X.yaml --world-size N"""
import argparse
import json

from .config import deepspeed_config, load_config

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--world-size", type=int, default=1)
    a = p.parse_args()
    print(json.dumps(deepspeed_config(load_config(a.config, a.set), a.world_size), indent=2))
