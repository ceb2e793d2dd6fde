"""optimizer.type on 2 processes (torchrun, gloo), against single-process runs of the same optimizer:
OrthoAdam at DP=2 and PP=2 follows the single-process run (its rotations are keyed by the global
parameter names, so a pipeline stage rotates as the whole model does), and resumes its single-process
checkpoint at PP=2 and DP=2 (elastic, its moments in their rotated basis); at TP=2 it runs (the split
axes get a block-diagonal rotation, another optimizer than at TP=1: runs, finite, near the TP=1 curve)
and a TP change on resume is refused. SGD at DP=2 ZeRO-2 and TP=2 ZeRO-1, Muon at DP=2 ZeRO-1 and
PP=2 ZeRO-1 follow their single-process curves."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_testlib import BASE, DEMO, assert_exit_0, run_torchrun

pytestmark = pytest.mark.multiproc
WORKER = str(Path(__file__).with_name("layouts_worker.py"))
ORTHO = ["optimizer.type=orthoadam"]
SGD = ["optimizer.type=sgd", "optimizer.lr=0.05"]
MUON = ["optimizer.type=muon", "optimizer.muon_lr=0.02", "optimizer.lr=1e-3"]
# DP / PP change the order of the gradient sums (float32 roundings): the loss curves agree to ~1e-6
# (test_multiproc's bound for AdamW layouts is 1e-5).
LOSS_RTOL = 1e-5


def _here(sets, hook=None):
    from megatron_outeff.training.config import load_config
    from megatron_outeff.training.train import train

    return [loss for _, loss in train(load_config(DEMO, BASE + sets), model_hook=hook)["history"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from layouts_worker import weights_hook

    out = tmp_path_factory.mktemp("optimizers")
    weights = out / "initial_weights.pt"
    ref_dir = out / "ortho_ref"
    result = {
        "ortho": _here(
            ORTHO + [f"checkpoint.dir={ref_dir}", "checkpoint.save_interval=2", "checkpoint.keep_last=0"],
            weights_hook(str(weights)),
        ),
        "sgd": _here(SGD),
        "muon": _here(MUON + ["parallel.zero_stage=1"]),
    }
    resumes = {}
    for name in ("pp2", "dp2"):  # the single-process checkpoint, rewound to iteration 2
        d = out / f"resume_{name}"
        shutil.copytree(ref_dir, d)
        shutil.rmtree(d / "iter_0000004")
        (d / "latest").write_text("iter_0000002\n")
        resumes[name] = d
    layouts = {
        "ortho_dp2": ORTHO,
        "ortho_pp2": ORTHO + ["parallel.pipeline_parallel=2"],
        "ortho_tp2": ORTHO + ["parallel.tensor_parallel=2"],
        "ortho_resume_pp2": ORTHO + ["parallel.pipeline_parallel=2", f"checkpoint.dir={resumes['pp2']}"],
        "ortho_resume_dp2": ORTHO + [f"checkpoint.dir={resumes['dp2']}"],
        "sgd_dp2_z2": SGD + ["parallel.zero_stage=2"],
        "muon_dp2_z1": MUON + ["parallel.zero_stage=1"],
        "sgd_tp2_z1": SGD + ["parallel.tensor_parallel=2", "parallel.zero_stage=1"],
        "muon_pp2_z1": MUON + ["parallel.pipeline_parallel=2", "parallel.zero_stage=1"],
    }
    args = [f"{n}:" + ",".join(s) for n, s in layouts.items()]
    assert_exit_0(run_torchrun(WORKER, out / "job.json", *args, timeout=1200, WEIGHTS=str(weights)))
    result.update(json.loads((out / "job.json").read_text()))
    result["dirs"] = {"ref": ref_dir, **resumes}
    return result


@pytest.mark.parametrize("layout", ["ortho_dp2", "ortho_pp2"])
def test_orthoadam_dp_and_pp_follow_the_single_process_run(runs, layout):
    torch.testing.assert_close(torch.tensor(runs[layout]), torch.tensor(runs["ortho"]), rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("layout", ["pp2", "dp2"])
def test_orthoadam_resumes_on_another_dp_or_pp_layout(runs, layout):
    """Iterations 3-4 resumed at the new layout from the single-process iteration-2 checkpoint: the
    uninterrupted run's losses, and at the end its weights and rotated-basis moments."""
    torch.testing.assert_close(
        torch.tensor(runs[f"ortho_resume_{layout}"]), torch.tensor(runs["ortho"][2:]), rtol=LOSS_RTOL, atol=0
    )
    from test_elastic import _full, _tol

    for sub in ("model", "optimizer/exp_avg", "optimizer/exp_avg_sq"):
        got, want = _full(runs["dirs"][layout], sub), _full(runs["dirs"]["ref"], sub)
        for k in want:
            torch.testing.assert_close(
                got[k], want[k], rtol=0, atol=_tol(want[k]), msg=lambda m, sub=sub, k=k: f"{sub} {k}: {m}"
            )


def test_orthoadam_tp2_runs_and_a_tp_change_on_resume_is_refused(runs, tmp_path):
    from megatron_outeff.training import elastic
    from megatron_outeff.training.config import load_config

    tp2 = torch.tensor(runs["ortho_tp2"])
    assert torch.isfinite(tp2).all()
    # another (block-diagonal on the split axes) rotation: near, not equal, to the TP=1 curve
    torch.testing.assert_close(tp2, torch.tensor(runs["ortho"]), rtol=1e-2, atol=0)
    tag = runs["dirs"]["ref"] / "iter_0000002"
    reason = elastic.check_resume(load_config(DEMO, BASE + ORTHO + ["parallel.tensor_parallel=2"]), tag, 2)
    assert reason.startswith("optimizer.type=orthoadam: resuming") and "resume at tensor_parallel=1" in reason
    assert elastic.check_resume(load_config(DEMO, BASE + ORTHO + ["parallel.pipeline_parallel=2"]), tag, 2) is None


@pytest.mark.parametrize(
    "kind, layout", [("sgd", "sgd_dp2_z2"), ("muon", "muon_dp2_z1"), ("sgd", "sgd_tp2_z1"), ("muon", "muon_pp2_z1")]
)
def test_sgd_and_muon_layouts_follow_one_process(runs, kind, layout):
    torch.testing.assert_close(torch.tensor(runs[layout]), torch.tensor(runs[kind]), rtol=LOSS_RTOL, atol=0)
