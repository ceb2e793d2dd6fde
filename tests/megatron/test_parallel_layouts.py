"""Every attention variant under TP=2, TP=2+SP and PP=2 equals the TP=1 model (one torchrun launch).

The worker (``_parallel_worker.py``) runs all variants x layouts in ONE 2-process launch over gloo
and writes a JSON report; the tests below assert on it.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from tolerance import network_depth, rounding_bound

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# Loaded by path: a tests/megatron package would shadow the real `megatron` package.
_spec = importlib.util.spec_from_file_location("_outeff_parallel_worker", os.path.join(HERE, "_parallel_worker.py"))
_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_worker)
LAYOUTS, VARIANTS = _worker.LAYOUTS, _worker.VARIANTS
# float32 on both sides; TP/PP/SP only reorder sums (all-reduces over gloo, split matmuls): the bound
# of tests/tolerance.py for the worker's model (2 layers, hidden 64, FFN 128, 16 tokens, vocab 128;
# backward doubles the chain), on the loss's and the largest gradient's magnitude.
DEPTH = 2 * (network_depth(dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, max_position_embeddings=16)) + 128)


def _check(entry, ref):
    assert entry["loss_diff"] <= rounding_bound(torch.float32, ref["loss"], DEPTH), entry
    assert entry["grad_diff"] <= rounding_bound(torch.float32, ref["grad_max"], DEPTH), entry


pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "report.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        os.path.join(ROOT, "tests", "megatron", "_parallel_worker.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert not data["errors"], "\n".join(data["errors"])
    return data


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_layout_matches_tp1(report, layout, variant):
    entry = report[layout][variant]
    _check(entry, report["tp1"][variant])
    assert entry["num_grads"] == report["tp1"][variant]["num_grads"], entry
    if "init_slice_diff" in entry:  # same seed + use_cpu_initialization: shards are exact slices
        assert entry["init_slice_diff"] == 0.0, entry


@pytest.mark.parametrize("variant", _worker.DDP_VARIANTS)
def test_megatron_ddp_finalize_grads_tp2_sp(report, variant):
    entry = report["tp2_sp_megatron_ddp"][variant]
    _check(entry, report["tp1"][variant])
    assert entry["num_grads"] == report["tp1"][variant]["num_grads"], entry


def test_variants_differ_from_vanilla(report):
    # The parity checks above only mean something if the variants really change the model, by more
    # than the bound those checks allow.
    losses = {k: v["loss"] for k, v in report["tp1"].items()}
    for name, loss in losses.items():
        if name != "vanilla":
            assert abs(loss - losses["vanilla"]) > rounding_bound(torch.float32, loss, DEPTH), (name, losses)


@pytest.mark.parametrize("variant", _worker.CHECKPOINT_VARIANTS)
def test_dist_checkpoint_tp2_to_tp1(report, variant):
    entry = report["ckpt_tp2_to_tp1"][variant]
    assert entry["weight_diff"] == 0.0, entry
