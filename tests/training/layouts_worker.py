"""Run several parallel layouts in one torchrun job and write each one's loss curve to JSON.

    torchrun --nproc_per_node N tests/training/layouts_worker.py OUT.json LAYOUT [LAYOUT ...]
LAYOUT: name:key=value,key=value (config overrides on top of train_testlib.BASE), e.g. "zero2:parallel.zero_stage=2".

megatron initialises TP layouts identically to TP=1 (use_cpu_initialization), but a pipeline stage
draws its layers' weights from a different RNG position. With WEIGHTS=path set, a single-process
layout saves its initial weights there (global layer numbers) and every other layout loads its
PP stage / TP slice of them.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from train_testlib import BASE, DEMO, finish_worker  # noqa: E402

from megatron_outeff.training.config import load_config  # noqa: E402
from megatron_outeff.training.model import unwrap  # noqa: E402
from megatron_outeff.training.train import train  # noqa: E402


def _global_names(model):
    """{local state-dict key: key with the global layer number} for this pipeline stage."""
    layers = model.decoder.layers
    out = {}
    for key in model.state_dict():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", key)
        out[key] = f"decoder.layers.{layers[int(m.group(1))].layer_number - 1}.{m.group(2)}" if m else key
    return out


def weights_hook(path):
    """World size 1: save the initial weights. Otherwise: load this rank's PP stage / TP slice of them."""

    def hook(model):
        from megatron.core import parallel_state as ps

        model = unwrap(model)
        if dist.get_world_size() == 1:
            torch.save({k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}, path)
            return
        full = torch.load(path, weights_only=True)
        names = _global_names(model)
        tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        with torch.no_grad():
            for local, param in model.named_parameters():
                name = names[local]
                src = full.get(name)
                if src is None and name == "output_layer.weight":  # tied: the last stage's copy
                    src = full["embedding.word_embeddings.weight"]
                if src is None:
                    continue
                if getattr(param, "tensor_model_parallel", False) and tp > 1:
                    # megatron's split (_initialize_affine_weight_cpu): tp * stride blocks, rank r takes r, r + tp, ...
                    # (stride 2: SwiGLU's fc1 holds [gate rows of r; up rows of r])
                    stride = getattr(param, "partition_stride", 1)
                    src = torch.cat(
                        src.chunk(tp * stride, dim=param.partition_dim)[tp_rank::tp], dim=param.partition_dim
                    )
                assert src.shape == param.shape, (local, src.shape, param.shape)
                param.copy_(src)

    return hook


def main():
    out, layouts = sys.argv[1], sys.argv[2:]
    weights = os.environ.get("WEIGHTS")
    results = {}
    for layout in layouts:
        name, _, sets = layout.partition(":")
        cfg = load_config(DEMO, BASE + [s for s in sets.split(",") if s])
        hook = weights_hook(weights) if weights else None
        results[name] = [loss for _, loss in train(cfg, model_hook=hook)["history"]]
    finish_worker(out, results)


if __name__ == "__main__":
    main()
