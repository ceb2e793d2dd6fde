"""launch/demo.sh's Bigram-Backcopy step (issue 21 item 6): the experiment it runs is the pre-registered
bb-sink setting with two arms, and the demo's own --set overrides are accepted by the experiment loader
(a renamed key or arm would otherwise surface only after ~6 minutes of demo)."""

import re
import shlex
import subprocess
from pathlib import Path

from megatron_outeff.evaluation.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "launch" / "demo.sh"


def _experiment_call() -> list[str]:
    text = DEMO.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "tools/run_experiment.py" in ln)
    return shlex.split(line[line.index("tools/run_experiment.py") :])


def test_demo_script_parses():
    subprocess.run(["bash", "-n", str(DEMO)], check=True)


def test_demo_bigram_backcopy_step_is_bb_sink_with_two_arms():
    args = _experiment_call()
    config = args[args.index("--config") + 1]
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    exp = load_experiment(ROOT / config, sets)
    assert config == "configs/experiments/bb-sink-cpu.yaml"
    assert list(exp.arms) == ["vanilla", "softmax1"] and [r.arm for r in exp.runs()] == ["vanilla", "softmax1"]
    assert exp.evaluation.deployable is False
    # the pre-registered training setting is untouched: only arms and the evaluation's extras change
    full = load_experiment(ROOT / config)
    assert exp.training == full.training
    assert all(re.match(r"(arms|evaluation\.deployable)=", s) for s in sets)


def test_bad_demo_length_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "demo"
    env = {"PATH": "/usr/bin:/bin", "DEMO_TRAIN_ITERS": "abc"}
    r = subprocess.run(["bash", str(DEMO), str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: DEMO_TRAIN_ITERS=abc: expected a positive integer"
    assert not out.exists()
