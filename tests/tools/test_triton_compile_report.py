"""tools/triton_compile_report.py --compare: which kernels kept their SASS between two reports (no compile)."""

import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = runpy.run_path(str(ROOT / "tools" / "triton_compile_report.py"))
# Real records to perturb: the committed report of this revision's flash kernels.
REPORT = json.loads((ROOT / "tools" / "results" / "flash_compile_report.json").read_text())


def _key(fact):
    return " ".join(str(fact[k]) for k in ("kernel", "arch", "config", "specialisation"))


def test_compare_counts_identical_changed_and_missing_kernels():
    kept, moved, gone, added = REPORT["facts"][:4]
    changed = dict(
        moved, sass_sha256="0" * 16, registers=moved["registers"] + 40, spill_stores=moved["spill_stores"] + 4
    )
    old = {"triton": REPORT["triton"], "facts": [kept, moved, gone]}
    new = {"triton": REPORT["triton"], "facts": [kept, changed, added]}
    text = TOOL["compare_reports"](old, new, "old.json")
    assert "3 kernels here, 3 there: **1 identical SASS**, 1 different, 1 only here, 1 only there." in text
    row = next(line for line in text.splitlines() if moved["config"] in line and moved["specialisation"] in line)
    assert f"registers {moved['registers']} -> {moved['registers'] + 40}" in row
    assert f"spill_stores {moved['spill_stores']} -> {moved['spill_stores'] + 4}" in row and "instructions" not in row
    assert f"Only here: {_key(added)}" in text and f"Only there: {_key(gone)}" in text


def test_compare_refuses_a_report_without_hashes(tmp_path, capsys):
    old = tmp_path / "old.json"
    fact = dict(REPORT["facts"][0])
    del fact["sass_sha256"]
    old.write_text(json.dumps({"facts": [fact]}))
    assert TOOL["main"](["--compare", str(old), "--output-prefix", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --compare {old}: expected a report of this tool with sass_sha256 per kernel\n"
    assert list(tmp_path.iterdir()) == [old]  # refused before compiling or writing anything
