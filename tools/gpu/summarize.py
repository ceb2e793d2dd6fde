#!/usr/bin/env python
"""Builds the GPU check's summary.json and summary.md from what its steps left (tools/gpu/run.sh).

run.sh calls it after every step, so the summary exists and is current even when a later step
fails, hangs or the whole run is stopped. Inputs (each optional; a missing one is reported):
  WORK/env.json             tools/gpu/env_report.py: device, capability, driver, versions, imports
  WORK/steps.jsonl          one line per finished step: name, status, rc, seconds, limit_s, note
  WORK/*.md                 Markdown tables the benchmarks wrote (appended to summary.md)
  OUT/tests.xml             pytest's JUnit XML (step a)
  OUT/bench_attention.json  tools/bench_attention.py (step b): per-shape target checks
  OUT/bench_train.json      tools/bench_train.py (step c): training throughput targets
Outputs: OUT/summary.json and OUT/summary.md (the shape of tools/results/gpu/summary.json):
  device, capability, driver, versions, rehearsal, time_scale, budget_s, steps, tests, sdpa_backend
  (SDPA's choice per shape and the kernels our methods ran), training, and targets: a map from each
  performance target (megatron_outeff/bench/targets.py, GPU_TARGETS: the one list) to
  {value, goal, op, met, detail}. A target measured at several shapes takes the worst value over them
  (the largest ratio for "<=" goals, the smallest for ">=") and is met only when every shape meets
  it; value and met are null when no step measured it ("report" targets: met is always null).

    python tools/gpu/summarize.py --output-dir OUT_DIR --work WORK_DIR [--rehearsal] [--time-scale F] [--budget S]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

from megatron_outeff.bench.targets import GPU_TARGETS, aggregate
from megatron_outeff.utils.markdown import md_row

STEP_ORDER = ("setup", "env", "aot_sm90", "bench_attention", "bench_train", "tests", "experiment")


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_counts(xml_path: Path) -> dict | None:
    """passed/failed/errors/skipped and the failing test ids from pytest's JUnit XML."""
    try:
        root = ElementTree.parse(xml_path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    for case in root.iter("testcase"):
        tid = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            counts["failures"].append(tid)
        elif case.find("error") is not None:
            counts["errors"] += 1
            counts["failures"].append(tid)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def sdpa_backends(doc: dict | None) -> dict | None:
    """SDPA's backend per shape (the baseline's torch._fused_sdp_choice) and the kernels each of our
    methods ran, from bench_attention.json."""
    if not doc:
        return None
    ran = {}
    for r in doc.get("results", []):
        if r.get("kernel") and r.get("status") == "ok":
            ran.setdefault(r["method"], set()).add(r["kernel"])
    return {
        "sdpa_choice": (doc.get("meta") or {}).get("sdpa_backends"),
        "pinned": (doc.get("meta") or {}).get("sdpa_backend_pin"),
        "kernels_ran": {m: sorted(k) for m, k in ran.items()},
    }


def build(out: Path, work: Path, rehearsal: bool, time_scale: float = 1.0, budget: int | None = None) -> dict:
    env = _load_json(work / "env.json") or {}
    steps = {}
    if (work / "steps.jsonl").is_file():
        for line in (work / "steps.jsonl").read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                steps[rec.pop("name")] = rec
    sources = {t.source: _load_json(out / f"{t.source}.json") for t in GPU_TARGETS}
    targets = {}
    for t in GPU_TARGETS:
        doc = sources.get(t.source)
        targets[t.key] = aggregate((doc or {}).get("targets", []), t.key)
        targets[t.key]["what"] = t.what
        if doc is None:
            targets[t.key]["detail"] = f"not measured: no {t.source}.json"
        elif (doc.get("meta") or {}).get("partial"):
            targets[t.key]["detail"] += f" (partial {t.source} run: cut before it ended)"
    train = sources.get("bench_train") or {}
    return {
        "device": env.get("device"),
        "capability": env.get("capability"),
        "driver": env.get("driver"),
        "cuda": env.get("cuda"),
        "python": env.get("python"),
        "versions": env.get("versions", {}),
        "environment_ok": env.get("ok"),
        "rehearsal": rehearsal,
        "time_scale": time_scale,
        "budget_s": budget,
        "note": (
            "CPU rehearsal (Triton interpreter, tiny shapes): values prove the pipeline, not performance"
            if rehearsal
            else "measured on the device named above"
        ),
        "updated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "steps": {k: steps.get(k, {"status": "not run"}) for k in STEP_ORDER if k in steps or k != "aot_sm90"},
        "tests": test_counts(out / "tests.xml"),
        "sdpa_backend": dict(env=env.get("sdpa_backend"), **(sdpa_backends(sources.get("bench_attention")) or {})),
        "training": [
            {
                k: r.get(k)
                for k in ("variant", "tokens_per_s", "throughput_vs_vanilla", "mfu", "peak_memory_mib", "steps_timed")
            }
            for r in train.get("rows", [])
        ],
        "targets": targets,
    }


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3f}"
    return str(x)


def markdown(summary: dict, work: Path) -> str:
    lines = [
        f"# GPU check{' (CPU rehearsal)' if summary['rehearsal'] else ''}: {summary['device']}",
        "",
        f"{summary['note']}. Updated {summary['updated_utc']}.",
        "",
        f"Driver {summary['driver']}, CUDA {summary['cuda']}, Python {summary['python']}; "
        + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()),
        "",
        f"Time scale {summary['time_scale']}, overall budget {summary['budget_s']} s. SDPA backend: "
        f"{summary['sdpa_backend']}",
        "",
        md_row(["step", "status", "seconds", "limit s", "note"]),
        "|---|---|---:|---:|---|",
    ]
    for name, st in summary["steps"].items():
        lines.append(
            md_row([name, st.get("status"), _fmt(st.get("seconds")), _fmt(st.get("limit_s")), st.get("note", "")])
        )
    t = summary["tests"]
    lines += [
        "",
        "Tests: "
        + (
            "no JUnit report"
            if t is None
            else f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped"
        ),
    ]
    if t and t["failures"]:
        lines += [f"- FAILED {f}" for f in t["failures"]]
    lines += ["", md_row(["target", "value", "goal", "met", "detail"]), "|---|---:|---|---|---|"]
    for key, tg in summary["targets"].items():
        met = {True: "MET", False: "NOT MET", None: "-"}[tg["met"]]
        lines.append(md_row([key, _fmt(tg["value"]), f"{tg['op']} {_fmt(tg['goal'])}", met, tg["detail"]]))
    for md in sorted(work.glob("*.md")):
        lines += ["", md.read_text().strip().replace("\n# ", "\n## ").replace("# ", "## ", 1)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", required=True, help="the run's OUT_DIR")
    p.add_argument("--work", required=True, help="the run's scratch folder (env.json, steps.jsonl, *.md)")
    p.add_argument("--rehearsal", action="store_true", help="the run was a CPU rehearsal")
    p.add_argument("--time-scale", type=float, default=1.0, help="run.sh's --time-scale (recorded)")
    p.add_argument("--budget", type=int, default=None, help="run.sh's overall budget in seconds (recorded)")
    args = p.parse_args(argv)
    out, work = Path(args.output_dir), Path(args.work)
    for flag, path in (("--output-dir", out), ("--work", work)):
        if not path.is_dir():
            print(f"summarize.py: {flag} {path}: not a folder", file=sys.stderr)
            return 2
    summary = build(out, work, args.rehearsal, args.time_scale, args.budget)
    (out / "summary.json.tmp").write_text(json.dumps(summary, indent=1))
    (out / "summary.json.tmp").replace(out / "summary.json")
    (out / "summary.md.tmp").write_text(markdown(summary, work))
    (out / "summary.md.tmp").replace(out / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
