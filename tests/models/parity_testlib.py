"""Shared pieces of the parity tests against transformers (test_opt_parity.py, test_llama_parity.py) and of
their 2-process torchrun workers (_opt_parity_worker.py, _llama_parity_worker.py).

(A uniquely named module, not conftest.py: the workers import it too, and several test folders have a
conftest.)"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- the test's side
def run_worker(worker: str, *args, timeout: int) -> None:
    """Runs ``tests/models/<worker> *args`` on 2 processes (torchrun over gloo, a free port) with the
    repository on PYTHONPATH; a failed run fails the test with the tail of its output."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    torchrun = Path(sys.executable).with_name("torchrun")
    worker_path = Path(__file__).with_name(worker)
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), str(worker_path)]
    proc = subprocess.run(cmd + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the references
def randomise_(model):
    """Every weight of a transformers model drawn anew from the global generator (norm weights 1 + N(0, 0.2^2),
    the rest N(0, 0.2^2); transformers starts biases at 0 and norms at 1), so that a swapped or dropped
    tensor cannot hide. Returns ``model``."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.2 * torch.randn_like(p))
    return model


# ----------------------------------------------------------------------------- the workers' side
def positions(tokens: torch.Tensor) -> torch.Tensor:
    """Position ids 0..s-1 of every row of ``tokens`` [b, s]."""
    return torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)


def pipeline_forward(model, tokens: torch.Tensor, hidden_size: int, pp: int):
    """Logits [b, s, V] on the last pipeline stage (None elsewhere); for pp=2 a manual 2-stage pipeline:
    stage 0's hidden states [s, b, h] go to stage 1."""
    from megatron.core import parallel_state as ps

    if pp == 1:
        return model(tokens, positions(tokens), None, runtime_gather_output=True)
    if ps.get_pipeline_model_parallel_rank() == 0:
        dist.send(model(tokens, positions(tokens), None).contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    hidden = torch.empty(tokens.shape[1], tokens.shape[0], hidden_size)
    dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
    model.set_input_tensor(hidden)
    return model(tokens, positions(tokens), None, runtime_gather_output=True)


def local_grads(model, sp: bool) -> dict:
    """{name: this rank's gradient} after a backward; under sequence parallelism the parameters marked
    sequence_parallel (norms, OPT's project_out) hold partial sums per rank: all-reduced over the TP group,
    as megatron's finalize_model_grads does."""
    from megatron.core import parallel_state as ps

    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad
        if sp and getattr(p, "sequence_parallel", False):
            grad = grad.clone()
            dist.all_reduce(grad, group=ps.get_tensor_model_parallel_group())
        grads[name] = grad
    return grads


def mismatched_keys(want: dict, got: dict) -> list:
    """The first 5 (sorted) names missing on either side or whose tensors are not equal (torch.equal)."""
    return sorted(k for k in set(want) | set(got) if k not in got or k not in want or not torch.equal(got[k], want[k]))[
        :5
    ]


def write_merged(res: dict, out_json: str) -> None:
    """Every rank computed some entries (PP=2 logits live on the last stage): rank 0 writes their union as JSON."""
    all_res = [None] * dist.get_world_size()
    dist.all_gather_object(all_res, res)
    if dist.get_rank() == 0:
        merged = {}
        for r in all_res:
            merged.update(r)
        with open(out_json, "w") as f:
            json.dump(merged, f, indent=1)
    dist.barrier()
