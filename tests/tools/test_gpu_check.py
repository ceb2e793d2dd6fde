"""The GPU check's plumbing (tools/gpu/): target aggregation, the summary, and run.sh's refusals.

The GPU run itself needs a GPU; its CPU rehearsal (`tools/gpu/run.sh OUT --rehearse`) is committed
under tools/results/gpu/rehearsal/. These tests are quick and need no GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tools" / "gpu"))
import bench_attention  # noqa: E402
import summarize  # noqa: E402


def _row(method, sq, fwdbwd_ms, peak_mib, b, d=64):
    return dict(dtype="bf16", b=b, h=2048 // d, sq=sq, d=d, method=method, status="ok", fwd_ms=fwdbwd_ms / 3,
                fwdbwd_ms=fwdbwd_ms, peak_mib=peak_mib)


def _results():
    """Three shapes (b * sq = 16384): flash 1.05x SDPA at 2k, 1.20x at 4k (a miss), 0.95x at 1k (outside
    the targets' 2k-16k range, so it must not count); megatron 4x slower at 4k; flash memory per
    sequence doubles with sq (linear)."""
    rows = []
    for sq, ratio, b in ((1024, 0.95, 16), (2048, 1.05, 8), (4096, 1.20, 4)):
        rows.append(_row("sdpa_vanilla", sq, 10.0, 100.0, b))
        rows.append(_row("outeff_flash", sq, 10.0 * ratio, 160.0, b))   # b * peak-per-seq constant
        rows.append(_row("outeff_flash_gated", sq, 10.5, 170.0, b))
    rows.append(_row("mcore_offbyone", 4096, 48.0, 9000.0, 4))
    for r in rows:
        r["ratio_fwdbwd"] = r["fwdbwd_ms"] / 10.0
    return rows


def test_targets_worst_shape_and_range(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(), work.mkdir()
    checks = bench_attention.check_targets(_results())
    (out / "bench_attention.json").write_text(json.dumps({"meta": {}, "results": [], "targets": checks}))
    (out / "bench_train.json").write_text(json.dumps({"rows": [], "targets": [
        {"target": "OPT-125m Softmax_1 tokens/s >= 0.97x vanilla", "value": 0.99, "goal": 0.97, "op": ">=", "met": True},
        {"target": "OPT-125m Softmax_1 >= 400k tokens/s", "value": 350e3, "goal": 400e3, "op": ">=", "met": False}]}))
    assert summarize.main(["--output-dir", str(out), "--work", str(work)]) == 0
    t = json.loads((out / "summary.json").read_text())["targets"]
    assert t["softmax1_flash_fwdbwd_vs_sdpa"]["value"] == pytest.approx(1.20)      # worst of 2k, 4k; not 1k
    assert t["softmax1_flash_fwdbwd_vs_sdpa"]["met"] is False
    assert "sq': 4096" in t["softmax1_flash_fwdbwd_vs_sdpa"]["detail"]
    assert t["gated_flash_fwdbwd_vs_sdpa"] == dict(t["gated_flash_fwdbwd_vs_sdpa"], value=pytest.approx(1.05), met=True)
    assert t["softmax1_flash_speedup_vs_mcore_offbyone_s4096"]["value"] == pytest.approx(48.0 / 12.0)
    assert t["softmax1_flash_speedup_vs_mcore_offbyone_s4096"]["met"] is True
    assert t["softmax1_flash_memory_growth_per_doubling_s"]["value"] == pytest.approx(2.0)  # linear in sq
    assert t["clipped_flash_fwdbwd_vs_sdpa"]["value"] is None and t["clipped_flash_fwdbwd_vs_sdpa"]["met"] is None
    assert t["opt125m_softmax1_tokens_per_s"]["met"] is False
    assert t["opt125m_softmax1_tokens_per_s_vs_vanilla"]["met"] is True
    md = (out / "summary.md").read_text()
    assert "| softmax1_flash_fwdbwd_vs_sdpa | 1.200 | <= 1.100 | NOT MET |" in md


def test_summary_without_any_step_output(tmp_path):
    """The summary exists from the first step on: nothing measured yet is null, not an error."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(), work.mkdir()
    (work / "steps.jsonl").write_text(json.dumps(dict(name="setup", status="ok", rc=0, seconds=3, limit_s=120,
                                                      note="")) + "\n")
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


@pytest.mark.parametrize("args,pattern", [
    ([], "no OUT_DIR"),
    (["{tmp}/out", "--fast"], "unknown option '--fast'"),
    (["{tmp}/full"], "is not empty"),
    (["{tmp}/a", "{tmp}/b"], "two output folders"),
])
def test_run_sh_refuses_bad_arguments(tmp_path, args, pattern):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "tools/gpu/run.sh")] + [a.format(tmp=tmp_path) for a in args],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and pattern in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]          # nothing created
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"          # nothing overwritten
