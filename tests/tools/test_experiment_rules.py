"""The mapping form of experiments (issue 21): arms = attention x optimizer overlays with seeds, the
curve scores by hand, the pre-registered rules judged by hand on constructed results (every seed must
agree; same step and matched copy loss; positive and pipeline controls). Its bad-input refusals (a rule
naming an arm that is not in the experiment, a bit width outside 2-16, an arm an optimizer cannot serve)
are in test_experiment.py's table of refusals."""

import runpy
from pathlib import Path

import pytest
import yaml
from evallib import run_experiment

from megatron_outeff.evaluation.experiment import (
    curve_score,
    experiment_from_dict,
    judge_rules,
    load_experiment,
    matched_step,
)

ROOT = Path(__file__).resolve().parents[2]
main = runpy.run_path(str(ROOT / "tools" / "run_experiment.py"))["main"]
CPU = ROOT / "configs" / "experiments" / "bb-massive-cpu.yaml"
GPU = ROOT / "configs" / "experiments" / "bb-massive-gpu.yaml"


def test_curve_score_by_hand():
    pts = [[10, 1.0], [20, 2.0], [30, 4.0], [40, 6.0], [50, 5.0]]
    s = curve_score(pts, tail=3)
    assert s["last"] == pytest.approx((4.0 + 6.0 + 5.0) / 3) and s["at"] == 50
    # second half: steps >= 25: (30, 4), (40, 6), (50, 5): slope = sum((s - 40)(v - 5)) / sum((s - 40)^2) = 10 / 200
    assert s["slope"] == pytest.approx(1000 * 10 / 200)
    cut = curve_score(pts, end_step=40, tail=2)  # the common step range of time-limited runs
    assert cut["last"] == pytest.approx(5.0) and cut["at"] == 40
    # steps >= 20: (20, 2), (30, 4), (40, 6): slope 0.2 per step
    assert cut["slope"] == pytest.approx(200.0)
    assert curve_score([], tail=3) == {"last": None, "slope": None, "at": None}
    assert curve_score([[10, 1.0]], tail=3)["slope"] is None
    assert matched_step([[10, 0.9], [20, 0.3], [30, 0.1]], 0.3) == 20
    assert (
        matched_step([[10, 0.9], [20, 0.3]], 0.2) is None
        and matched_step([[10, 0.9], [20, 0.3]], 0.3, end_step=10) is None
    )


def _curve(values, start=100):
    return [[start * (i + 1), v] for i, v in enumerate(values)]


def _run(ma, ri, e, idle, kurt, inf, copy_loss, loss, b_star, b_star_pos0, inc4=0.5):
    curve = {
        "massive_activation": _curve(ma),
        "range_inflation": _curve(ri),
        "first_token_excess_norm": _curve(e),
        "first_token_mass_idle": _curve(idle),
        "avg_kurtosis": _curve(kurt),
        "max_inf_norm": _curve(inf),
        "probe_loss_copy": _curve(copy_loss),
    }
    final = {"loss": loss, "b_star": b_star, "b_star_first_token_float": b_star_pos0, "ppl_increase_a4": inc4}
    return {"curve": curve, "final": final}


# the baseline's and a good arm's results, metric by metric (_run's arguments): (baseline, good arm)
RUNS = {
    "ma": ([2, 4, 8, 12, 16, 20], [2, 2.5, 3, 3, 3, 3]),
    "ri": ([1.5, 2, 3, 4, 4, 4], [1.0, 1.0, 1.1, 1.1, 1.1, 1.1]),
    "e": ([0.2, 1, 2, 2.5, 3, 3], [0.2, 1, 2, 2.5, 3, 3]),
    "idle": ([0.1, 0.4, 0.8, 0.9, 0.9, 0.9], [0.1, 0.4, 0.8, 0.9, 0.9, 0.9]),
    "kurt": ([4, 8, 10, 12, 12, 12], [4, 4, 4, 4, 5, 5]),
    "inf": ([10, 20, 30, 30, 30, 30], [10, 10, 12, 12, 12, 12]),
    "copy_loss": ([3, 1, 0.3, 0.1, 0.05, 0.04], [3, 2, 1, 0.3, 0.1, 0.06]),
    "loss": (2.0, 2.02),
    "b_star": (6, 5),
    "b_star_pos0": (5, 4),
}
BASE_RUN = {k: base for k, (base, _) in RUNS.items()}
GOOD_RUN = {k: good for k, (_, good) in RUNS.items()}


def _experiment(arms=("base", "good"), seeds=(1, 2), matched=0.1, rules=None):
    data = yaml.safe_load(CPU.read_text())
    data["arms"] = {a: ({} if a == "base" else {"optimizer": {"type": "orthoadam"}}) for a in arms}
    data["seeds"] = list(seeds)
    data["claim"]["baseline"] = "base"
    data["claim"]["matched_copy_loss"] = matched
    data["claim"]["rules"] = rules or [
        {"rule": r, "arms": ["good"]}
        for r in ("removes_massive_activation", "removes_channel_outliers", "lowers_quantization_sensitivity")
    ]
    return experiment_from_dict(data)


def test_rules_by_hand_every_seed_must_agree():
    exp = _experiment()
    results = {("base", s): _run(**BASE_RUN) for s in (1, 2)}
    results.update({("good", s): _run(**GOOD_RUN) for s in (1, 2)})
    v = judge_rules(exp, results)
    assert v["control"]["passed"] and v["pipeline_control"]["passed"] and v["common_step"] == 600
    by = {r["rule"]: r for r in v["rules"]}
    ma = by["removes_massive_activation"]
    # MA last3 = 3 vs baseline (12 + 16 + 20) / 3 = 16: 2 <= 15 / 3; RI 1.1 <= 1.2; slope 0 <= baseline's / 3;
    # loss +1% within 2%. Matched copy loss 0.1: baseline at step 400 (MA 12), arm at 500 (MA 3): 2 <= 11 / 3
    s1 = ma["seeds"][1]
    assert s1["same_step"]["values"]["massive_activation"] == pytest.approx(3.0)
    assert s1["same_step"]["values"]["baseline_massive_activation"] == pytest.approx(16.0)
    assert s1["matched"]["reached"] == {"arm": 500, "baseline": 400} and s1["matched"]["passed"]
    assert ma["claimed"] is True
    # channel outliers: kurtosis last3 (4 + 5 + 5) / 3 <= 12 / 2 and inf norm 12 <= 30 / 2
    assert by["removes_channel_outliers"]["claimed"] is True
    # b* 5 <= 6 - 1 and 4 <= 5 - 1
    assert by["lowers_quantization_sensitivity"]["claimed"] is True
    assert len(v["claims"]) == 3

    # one seed disagrees (its MA rises like the baseline's): no claim for that rule, the others stand
    bad = dict(GOOD_RUN, ma=BASE_RUN["ma"])
    v2 = judge_rules(exp, {**results, ("good", 2): _run(**bad)})
    by2 = {r["rule"]: r for r in v2["rules"]}
    assert by2["removes_massive_activation"]["claimed"] is False
    assert by2["removes_massive_activation"]["seeds"][1]["same_step"]["passed"]
    assert not by2["removes_massive_activation"]["seeds"][2]["same_step"]["passed"]


def test_rules_matched_loss_control_and_pipeline():
    exp = _experiment()
    results = {("base", s): _run(**BASE_RUN) for s in (1, 2)}
    # the arm never reaches the matched copy loss: no claim of the curve rules (same step alone is not enough)
    slow = dict(GOOD_RUN, copy_loss=[3, 2, 1.5, 1.2, 1.1, 1.0])
    v = judge_rules(exp, {**results, **{("good", s): _run(**slow) for s in (1, 2)}})
    by = {r["rule"]: r for r in v["rules"]}
    assert (
        by["removes_massive_activation"]["same_step_all_seeds"] and by["removes_massive_activation"]["claimed"] is False
    )
    assert by["removes_massive_activation"]["seeds"][1]["matched"]["note"] == "matched copy loss not reached"
    # b* lower only with position 0 counted: token-wise only
    tw = dict(GOOD_RUN, b_star_pos0=5)
    v = judge_rules(exp, {**results, **{("good", s): _run(**tw) for s in (1, 2)}})
    assert {r["rule"]: r for r in v["rules"]}["lowers_quantization_sensitivity"]["claimed"] == "token-wise only"
    # pipeline control: one run loses < 5% at 4 bits -> no quantization claim
    lazy = dict(GOOD_RUN, inc4=0.01)
    v = judge_rules(exp, {**results, ("good", 1): _run(**GOOD_RUN), ("good", 2): _run(**lazy)})
    q = {r["rule"]: r for r in v["rules"]}["lowers_quantization_sensitivity"]
    assert not v["pipeline_control"]["passed"] and q["claimed"] is False and "pipeline control" in q["why"]
    # positive control: a baseline seed without the massive activation (E stays 0.2) -> nothing claimed
    flat = dict(BASE_RUN, e=[0.2] * 6)
    v = judge_rules(exp, {**results, ("base", 2): _run(**flat), **{("good", s): _run(**GOOD_RUN) for s in (1, 2)}})
    assert not v["control"]["passed"] and not v["control"]["seeds"][2]["checks"]["first_token_excess_norm"]
    assert v["claims"] == []


def test_shipped_configs_load():
    for path in (CPU, GPU):
        exp = load_experiment(path)
        assert not exp.legacy and len(exp.seeds) >= 2 and exp.claim.baseline in exp.arms
        assert {
            "vanilla_adamw",
            "learnable_adamw",
            "vanilla_orthoadam",
            "learnable_orthoadam",
            "vanilla_sgd",
            "vanilla_headgate",
        } <= set(exp.arms)
        assert exp.evaluation.act_bits == [8, 6, 5, 4]
        runs = exp.runs()
        assert (
            len(runs) == len(exp.arms) * len(exp.seeds)
            and runs[0].dir.as_posix() == f"arms/{runs[0].arm}/seed{runs[0].seed}"
        )
    assert load_experiment(GPU).time_limit_s and load_experiment(CPU).time_limit_s is None


# bb-massive-gpu at CPU-test size (2 arms x 2 seeds at once, a 4 s training time limit): the overrides the
# GPU check's rehearsal passes too (tools/gpu/run.sh --rehearse), one owner
TINY_GPU = [
    line
    for line in (ROOT / "configs/experiments/bb-massive-gpu.rehearsal").read_text().splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def test_gpu_config_rehearsal(tmp_path):
    """bb-massive-gpu's runner path on CPU: runs at once, each stopped by the time limit (SIGTERM: the
    trainer saves), probes on disk, scored over the common step range; seeds' directories; the
    report's rules, seed bands and bit sweep; a second invocation keeps every finished run."""
    import json

    out = tmp_path / "exp"
    r = run_experiment(GPU, out, TINY_GPU, tmp_path, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert "run 1/4: vanilla_adamw seed 7" in r.stdout and "[vanilla_orthoadam/s8] iter 10" in r.stdout
    rep = json.loads((out / "report.json").read_text())
    assert sorted(rep["runs"]) == [
        "vanilla_adamw/s7",
        "vanilla_adamw/s8",
        "vanilla_orthoadam/s7",
        "vanilla_orthoadam/s8",
    ]
    for label, run in rep["runs"].items():
        assert run["time_limited"] is True, label
        assert (out / "arms" / label.replace("/s", "/seed") / "result.json").is_file()
        steps = [s for s, _ in run["curve"]["massive_activation"]]
        assert steps and steps == list(range(10, steps[-1] + 1, 10))  # probes every 10 steps up to the stop
        f = run["final"]
        assert {"b_star", "b_star_first_token_float", "ppl_increase_a4", "max_absmax_over_rms_quantized_tensor"} <= set(
            f
        )
    v = rep["verdict"]
    assert v["common_step"] == min(r["curve"]["massive_activation"][-1][0] for r in rep["runs"].values())
    assert isinstance(rep["positive_control"], bool) and {x["rule"] for x in v["rules"]} == {
        "removes_massive_activation",
        "lowers_quantization_sensitivity",
    }
    summary = rep["summary"]["vanilla_orthoadam"]["massive_activation"]
    assert summary["n"] == 2 and summary["min"] <= summary["mean"] <= summary["max"]
    md = (out / "report.md").read_text()
    assert md.startswith("# Experiment bb-massive-gpu") and "removes_massive_activation" in md
    assert (out / "massive_activation.png").is_file() and (out / "first_token_excess_norm.png").is_file()
    r2 = run_experiment(GPU, out, TINY_GPU, tmp_path)
    assert r2.returncode == 0 and r2.stdout.count("already complete") == 4, r2.stdout[-2000:] + r2.stderr[-2000:]
