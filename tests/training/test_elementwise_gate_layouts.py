"""The elementwise output gate (``attention.gate: elementwise``, with learnable offsets and the clipped softmax)
under the trainer's parallel layouts: DP=2 at ZeRO 0/1/2/3, TP=2, TP=2 + SP, PP=2 (2 processes, one torchrun
launch) reproduce the single-process loss curve, as every layout does for the other variants
(test_multiproc.py)."""

import pytest
from conftest import _run_oracle
from test_multiproc import TOL, WORKER
from train_testlib import assert_exit_0, run_torchrun

pytestmark = pytest.mark.multiproc
GATE = ["attention.softmax=learnable", "attention.gate=elementwise", "attention.clip_gamma=-0.02"]


@pytest.fixture(scope="module")
def oracle_elementwise(tmp_path_factory):
    return _run_oracle(tmp_path_factory, GATE)


def test_elementwise_gate_layouts_match_single_process(oracle_elementwise, tmp_path):
    import json

    gate = ",".join(GATE)
    layouts = [
        f"{name}:{gate}{',' if sets else ''}{sets}"
        for name, sets in (
            ("dp_zero0", ""),
            ("dp_zero1", "parallel.zero_stage=1"),
            ("dp_zero2", "parallel.zero_stage=2"),
            ("dp_zero3", "parallel.zero_stage=3"),
            ("tp2_zero1", "parallel.tensor_parallel=2,parallel.zero_stage=1"),
            ("tp2_sp_zero2", "parallel.tensor_parallel=2,parallel.sequence_parallel=true,parallel.zero_stage=2"),
            ("pp2_zero1", "parallel.pipeline_parallel=2,parallel.zero_stage=1"),
        )
    ]
    weights = str(oracle_elementwise["weights"])
    assert_exit_0(run_torchrun(WORKER, tmp_path / "out.json", *layouts, timeout=560, WEIGHTS=weights))
    results = json.loads((tmp_path / "out.json").read_text())
    assert sorted(results) == sorted(layout.split(":")[0] for layout in layouts)
    for name, losses in results.items():
        assert losses == pytest.approx(oracle_elementwise["losses"], abs=TOL), name
