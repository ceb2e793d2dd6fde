"""tools/triton_compile_report.py --compare: which kernels kept their SASS between two reports (no compile)."""

import json
import runpy
from pathlib import Path

import pytest

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


def _without_hash(fact):
    return {k: v for k, v in fact.items() if k != "sass_sha256"}


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda f: json.dumps({"facts": [_without_hash(f)]}), "facts[0] has sass_sha256=''"),
        (lambda f: json.dumps({"facts": [dict(f, newer_field=1)]}), "unexpected keyword argument 'newer_field'"),
        (lambda f: json.dumps({"facts": [{"sass_sha256": "x"}]}), "facts[0]: KernelFacts.__init__() missing"),
        (lambda f: json.dumps({"facts": ["sass_sha256"]}), "(facts: kernel records with sass_sha256)"),
        (lambda f: json.dumps([]), "(facts: kernel records with sass_sha256)"),
        (lambda f: json.dumps({"facts": [dict(f, sass_sha256="x")]}), "facts[0] has sass_sha256='x'"),
        (lambda f: "{not json", "not JSON (Expecting property name enclosed in double quotes at line 1)"),
        (lambda f: b"\xff\xfe{}", "not UTF-8 text"),
    ],
)
def test_compare_refuses_what_is_not_a_report_before_compiling(tmp_path, capsys, content, message):
    """--compare OLD.json is checked record by record (KernelFacts) first: one error line, exit 2, nothing
    compiled or written (a late TypeError after minutes of compiling would lose the run)."""
    old = tmp_path / "old.json"
    data = content(REPORT["facts"][0])
    old.write_bytes(data if isinstance(data, bytes) else data.encode())
    assert TOOL["main"](["--compare", str(old), "--output-prefix", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == [old]
