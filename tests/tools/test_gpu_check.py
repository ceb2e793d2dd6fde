"""The GPU check's plumbing (tools/gpu/): target aggregation, the summary, run.sh's refusals, and that a
run whose steps are cut by their time limits (--time-scale) still leaves every partial result.

The GPU run itself needs a GPU; its CPU rehearsal (`tools/gpu/run.sh OUT --rehearse`) is committed
under tools/results/gpu/rehearsal/."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tools" / "gpu"))
import bench_attention  # noqa: E402
import summarize  # noqa: E402

from megatron_outeff.bench.targets import GPU_TARGETS  # noqa: E402


def _row(method, sq, fwdbwd_ms, peak_mib, b, d=64, kernel=None):
    return dict(
        dtype="bf16",
        b=b,
        h=2048 // d,
        sq=sq,
        d=d,
        method=method,
        status="ok",
        fwd_ms=fwdbwd_ms / 3,
        fwdbwd_ms=fwdbwd_ms,
        peak_mib=peak_mib,
        kernel=kernel,
    )


def _results():
    """Three shapes (b * sq = 16384): Softmax_1 1.04x SDPA at 2k, 1.20x at 4k (a miss), 0.95x at 1k (outside
    the targets' 2k-16k range, so it must not count); learnable 1.03x everywhere; megatron 4x slower at
    4k; Softmax_1's memory per sequence doubles with sq (linear)."""
    rows = []
    for sq, ratio, b in ((1024, 0.95, 16), (2048, 1.04, 8), (4096, 1.20, 4)):
        rows.append(_row("sdpa_vanilla", sq, 10.0, 100.0, b, kernel="cudnn"))
        rows.append(_row("outeff_softmax1", sq, 10.0 * ratio, 160.0, b, kernel="cudnn"))  # b * peak-per-seq constant
        rows.append(_row("outeff_learnable", sq, 10.3, 160.0, b, kernel="cudnn"))
        rows.append(_row("outeff_gated", sq, 10.5, 170.0, b, kernel="cudnn"))
    rows.append(_row("mcore_offbyone", 4096, 48.0, 9000.0, 4))
    for r in rows:
        r["ratio_fwdbwd"] = r["fwdbwd_ms"] / 10.0
    return rows


def test_targets_worst_shape_and_range(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(), work.mkdir()
    checks = bench_attention.check_targets(_results())
    (out / "bench_attention.json").write_text(
        json.dumps(
            {"meta": {"sdpa_backends": {"bf16 d=64 sq=2048": "cudnn"}}, "results": _results(), "targets": checks}
        )
    )
    (out / "bench_train.json").write_text(
        json.dumps(
            {
                "rows": [],
                "targets": [
                    {
                        "key": "opt125m_softmax1_tokens_per_s_vs_vanilla",
                        "value": 0.99,
                        "goal": 0.98,
                        "op": ">=",
                        "met": True,
                    },
                    {"key": "opt125m_softmax1_mfu", "value": 0.41, "goal": None, "op": "report", "met": None},
                ],
            }
        )
    )
    assert (
        summarize.main(["--output-dir", str(out), "--work", str(work), "--time-scale", "0.5", "--budget", "200"]) == 0
    )
    s = json.loads((out / "summary.json").read_text())
    t = s["targets"]
    assert sorted(t) == sorted(x.key for x in GPU_TARGETS)
    assert t["softmax1_fwdbwd_vs_sdpa"]["value"] == pytest.approx(1.20)  # worst of 2k, 4k; not 1k
    assert t["softmax1_fwdbwd_vs_sdpa"]["met"] is False
    assert "sq': 4096" in t["softmax1_fwdbwd_vs_sdpa"]["detail"] and "cudnn" in t["softmax1_fwdbwd_vs_sdpa"]["detail"]
    assert (
        t["learnable_fwdbwd_vs_sdpa"]["value"] == pytest.approx(1.03) and t["learnable_fwdbwd_vs_sdpa"]["met"] is True
    )
    assert t["gated_fwdbwd_vs_sdpa"]["value"] == pytest.approx(1.05) and t["gated_fwdbwd_vs_sdpa"]["met"] is True
    assert t["softmax1_speedup_vs_mcore_offbyone_s4096"]["value"] == pytest.approx(48.0 / 12.0)
    assert t["softmax1_speedup_vs_mcore_offbyone_s4096"]["met"] is True
    assert t["softmax1_memory_growth_per_doubling_s"]["value"] == pytest.approx(2.0)  # linear in sq
    assert t["clipped_fwdbwd_vs_sdpa"]["value"] is None and t["clipped_fwdbwd_vs_sdpa"]["met"] is None
    assert t["opt125m_softmax1_tokens_per_s_vs_vanilla"]["met"] is True
    assert t["opt125m_softmax1_mfu"] == dict(t["opt125m_softmax1_mfu"], value=0.41, goal=None, met=None)
    assert s["sdpa_backend"]["sdpa_choice"] == {"bf16 d=64 sq=2048": "cudnn"}
    assert s["sdpa_backend"]["kernels_ran"]["outeff_softmax1"] == ["cudnn"]
    assert s["time_scale"] == 0.5 and s["budget_s"] == 200
    md = (out / "summary.md").read_text()
    assert "| softmax1_fwdbwd_vs_sdpa | 1.200 | <= 1.050 | NOT MET |" in md


def test_summary_without_any_step_output(tmp_path):
    """The summary exists from the first step on: nothing measured yet is null, not an error."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(), work.mkdir()
    (work / "steps.jsonl").write_text(
        json.dumps(dict(name="setup", status="ok", rc=0, seconds=3, limit_s=120, note="")) + "\n"
    )
    assert summarize.main(["--output-dir", str(out), "--work", str(work)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"]["setup"]["status"] == "ok" and s["steps"]["tests"] == {"status": "not run"}
    assert s["tests"] is None and all(v["value"] is None for v in s["targets"].values())
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "summary.md"]


def test_summarize_bad_folder(tmp_path, capsys):
    assert summarize.main(["--output-dir", str(tmp_path / "missing"), "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--output-dir" in err and "missing" in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args,pattern",
    [
        ([], "no OUT_DIR"),
        (["{tmp}/out", "--fast"], "unknown option '--fast'"),
        (["{tmp}/full"], "is not empty"),
        (["{tmp}/a", "{tmp}/b"], "two output folders"),
        (["{tmp}/out", "--time-scale", "0"], "--time-scale '0': expected a positive number"),
        (["{tmp}/out", "--time-scale", "fast"], "--time-scale 'fast': expected a positive number"),
        (["{tmp}/out", "--time-scale"], "--time-scale needs a value"),
    ],
)
def test_run_sh_refuses_bad_arguments(tmp_path, args, pattern):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(
        ["bash", str(ROOT / "tools/gpu/run.sh")] + [a.format(tmp=tmp_path) for a in args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 2 and pattern in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing created
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"  # nothing overwritten


@pytest.mark.slow
def test_time_scale_cuts_steps_and_keeps_partial_results(tmp_path):
    """`run.sh --rehearse --time-scale 0.05`, with the steps' limits set so that each scaled limit is
    30 s (the compile step skipped): the steps are cut by SIGINT and OUT_DIR still holds the summary,
    the log, the JUnit file, both benchmarks' JSON (marked partial when cut) and the experiment's
    archive (packed after its step returned)."""
    out = tmp_path / "out"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        GPU_LIMIT_AOT="0",
        GPU_LIMIT_ATTN="600",
        GPU_LIMIT_TRAIN="600",
        GPU_LIMIT_TESTS="600",
        GPU_LIMIT_EXPERIMENT="600",
        GPU_BUNDLE=str(tmp_path / "no-bundle"),
        TMPDIR=str(tmp_path),
    )
    env.pop("PYTEST_XDIST_WORKER", None)
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", str(ROOT / "tools/gpu/run.sh"), str(out), "--rehearse", "--time-scale", "0.05"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    wall = time.monotonic() - t0
    log = res.stdout + res.stderr
    assert wall < 360, f"{wall:.0f} s: the scaled limits did not hold\n{log[-3000:]}"
    names = sorted(p.name for p in out.iterdir())
    assert {
        "run.log",
        "summary.json",
        "summary.md",
        "tests.xml",
        "bench_attention.json",
        "bench_train.json",
        "experiment.tar.gz",
    } <= set(names), names
    assert len(names) <= 8
    s = json.loads((out / "summary.json").read_text())
    assert s["time_scale"] == 0.05 and s["rehearsal"] is True and s["budget_s"] == 360
    steps = s["steps"]
    assert steps["aot_sm90"]["status"] == "skipped"
    for name in ("bench_attention", "bench_train", "tests", "experiment"):
        assert steps[name]["limit_s"] <= 30, steps[name]
    cut = [n for n, st in steps.items() if st["status"] == "timeout"]
    assert cut, f"no step was cut: {steps}"
    assert res.returncode == 1  # a cut step is not a pass
    for name in ("bench_attention", "bench_train"):
        doc = json.loads((out / f"{name}.json").read_text())
        assert doc["meta"]["partial"] is (name in cut), (name, doc["meta"].get("partial"), cut)
    ElementTree.parse(out / "tests.xml")  # written although cut
    assert sorted(s["targets"]) == sorted(t.key for t in GPU_TARGETS)
    assert "not empty" not in log and not any(Path(tmp_path).glob("outeff-gpu.*"))  # scratch removed at the end
