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
  device, capability, driver, versions, rehearsal, steps, tests, and targets: a map from each
  performance target to {value, goal, op, met, detail}. A target measured at several shapes takes
  the worst value over them (the largest ratio for "<=" goals, the smallest for ">=") and is met
  only when every shape meets it; value and met are null when no step measured it.

    python tools/gpu/summarize.py --output-dir OUT_DIR --work WORK_DIR [--rehearsal]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

# The project's performance targets (H100/H200, bf16), in the order the summary lists them:
# key -> (source file, the name its producer gives the check, goal, op)
TARGETS = {
    "softmax1_flash_fwdbwd_vs_sdpa": ("bench_attention.json", "T1 flash softmax1 fwd+bwd <= 1.10x SDPA", 1.10, "<="),
    "softmax1_flash_speedup_vs_mcore_offbyone_s4096": (
        "bench_attention.json", "T2 flash >= 3x faster than mcore off-by-one at sq=4096", 3.0, ">="),
    "softmax1_flash_memory_growth_per_doubling_s": (
        "bench_attention.json", "T2 flash memory linear in sq (growth per doubling <= 2.5x)", 2.5, "<="),
    "clipped_flash_fwdbwd_vs_sdpa": ("bench_attention.json", "T3 clipped flash fwd+bwd <= 2.0x SDPA", 2.0, "<="),
    "gated_flash_fwdbwd_vs_sdpa": ("bench_attention.json", "T4 gated flash softmax1 fwd+bwd <= 1.10x SDPA", 1.10, "<="),
    "opt125m_softmax1_tokens_per_s_vs_vanilla": (
        "bench_train.json", "OPT-125m Softmax_1 tokens/s >= 0.97x vanilla", 0.97, ">="),
    "opt125m_softmax1_tokens_per_s": ("bench_train.json", "OPT-125m Softmax_1 >= 400k tokens/s", 400e3, ">="),
}
STEP_ORDER = ("setup", "env", "aot_sm90", "tests", "bench_attention", "bench_train", "experiment")


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def aggregate(checks: list[dict], name: str, goal: float, op: str) -> dict:
    """The worst of one target's per-shape checks: {value, goal, op, met, detail}."""
    mine = [c for c in checks if c.get("target") == name and c.get("value") is not None]
    if not mine:
        return {"value": None, "goal": goal, "op": op, "met": None, "detail": "not measured"}
    worst = (max if op == "<=" else min)(mine, key=lambda c: c["value"])
    met = all((c["value"] <= goal) if op == "<=" else (c["value"] >= goal) for c in mine)
    where = {k: worst[k] for k in ("dtype", "d", "sq") if worst.get(k) is not None}
    return {"value": worst["value"], "goal": goal, "op": op, "met": met,
            "detail": f"worst of {len(mine)} measurement(s)" + (f" at {where}" if where else "")}


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


def build(out: Path, work: Path, rehearsal: bool) -> dict:
    env = _load_json(work / "env.json") or {}
    steps = {}
    if (work / "steps.jsonl").is_file():
        for line in (work / "steps.jsonl").read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                steps[rec.pop("name")] = rec
    sources = {f: _load_json(out / f) for f in {t[0] for t in TARGETS.values()}}
    targets = {}
    for key, (src, name, goal, op) in TARGETS.items():
        doc = sources.get(src)
        targets[key] = aggregate((doc or {}).get("targets", []), name, goal, op)
        if doc is None:
            targets[key]["detail"] = f"not measured: no {src}"
        elif (doc.get("meta") or {}).get("partial"):
            targets[key]["detail"] += " (partial run: stopped before every shape was measured)"
    train = sources.get("bench_train.json") or {}
    return {
        "device": env.get("device"), "capability": env.get("capability"), "driver": env.get("driver"),
        "cuda": env.get("cuda"), "python": env.get("python"), "versions": env.get("versions", {}),
        "environment_ok": env.get("ok"),
        "rehearsal": rehearsal,
        "note": ("CPU rehearsal (Triton interpreter, tiny shapes): values prove the pipeline, not performance"
                 if rehearsal else "measured on the device named above"),
        "updated_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "steps": {k: steps.get(k, {"status": "not run"}) for k in STEP_ORDER if k in steps or k != "aot_sm90"},
        "tests": test_counts(out / "tests.xml"),
        "training": [{k: r.get(k) for k in ("variant", "tokens_per_s", "throughput_vs_vanilla", "mfu", "peak_memory_mib")}
                     for r in train.get("rows", [])],
        "targets": targets,
    }


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3f}"
    return str(x)


def markdown(summary: dict, work: Path) -> str:
    lines = [f"# GPU check{' (CPU rehearsal)' if summary['rehearsal'] else ''}: {summary['device']}", "",
             f"{summary['note']}. Updated {summary['updated_utc']}.", "",
             f"Driver {summary['driver']}, CUDA {summary['cuda']}, Python {summary['python']}; "
             + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()), "",
             "| step | status | seconds | limit s | note |", "|---|---|---:|---:|---|"]
    for name, st in summary["steps"].items():
        lines.append(f"| {name} | {st.get('status')} | {_fmt(st.get('seconds'))} | {_fmt(st.get('limit_s'))} | "
                     f"{st.get('note', '')} |")
    t = summary["tests"]
    lines += ["", "Tests: " + ("no JUnit report" if t is None else
                               f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped")]
    if t and t["failures"]:
        lines += [f"- FAILED {f}" for f in t["failures"]]
    lines += ["", "| target | value | goal | met | detail |", "|---|---:|---|---|---|"]
    for key, tg in summary["targets"].items():
        met = {True: "MET", False: "NOT MET", None: "-"}[tg["met"]]
        lines.append(f"| {key} | {_fmt(tg['value'])} | {tg['op']} {_fmt(tg['goal'])} | {met} | {tg['detail']} |")
    for md in sorted(work.glob("*.md")):
        lines += ["", md.read_text().strip().replace("\n# ", "\n## ").replace("# ", "## ", 1)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", required=True, help="the run's OUT_DIR")
    p.add_argument("--work", required=True, help="the run's scratch folder (env.json, steps.jsonl, *.md)")
    p.add_argument("--rehearsal", action="store_true", help="the run was a CPU rehearsal")
    args = p.parse_args(argv)
    out, work = Path(args.output_dir), Path(args.work)
    for flag, path in (("--output-dir", out), ("--work", work)):
        if not path.is_dir():
            print(f"summarize.py: {flag} {path}: not a folder", file=sys.stderr)
            return 2
    summary = build(out, work, args.rehearsal)
    (out / "summary.json.tmp").write_text(json.dumps(summary, indent=1))
    (out / "summary.json.tmp").replace(out / "summary.json")
    (out / "summary.md.tmp").write_text(markdown(summary, work))
    (out / "summary.md.tmp").replace(out / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
