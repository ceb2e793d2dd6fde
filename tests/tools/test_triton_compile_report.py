"""tools/triton_compile_report.py --compare: which kernels kept their SASS between two reports (no compile)."""

import json
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOL = runpy.run_path(str(ROOT / "tools" / "triton_compile_report.py"))


def _fact(kernel, spec, sha, registers=128, spills=0):
    return dict(
        kernel=kernel,
        arch=90,
        config="BLOCK_M=128 BLOCK_N=64 warps=8 stages=3",
        specialisation=spec,
        shared_bytes=98304,
        registers=registers,
        stack_bytes=0,
        spill_stores=spills,
        spill_loads=spills,
        wgmma=8,
        mma=0,
        instructions=1000,
        compile_s=1.0,
        unaligned="",
        sass_sha256=sha,
    )


def test_compare_counts_identical_changed_and_missing_kernels():
    old = {"triton": "3.6.0", "facts": [_fact("_fwd", "bf16 d128", "a" * 16), _fact("_bwd", "bf16 d128", "b" * 16)]}
    old["facts"].append(_fact("_gone", "bf16 d64", "c" * 16))
    new = {
        "triton": "3.6.0",
        "facts": [
            _fact("_fwd", "bf16 d128", "a" * 16),
            _fact("_bwd", "bf16 d128", "d" * 16, registers=168, spills=4),
            _fact("_new", "bf16 d64", "e" * 16),
        ],
    }
    text = TOOL["compare_reports"](old, new, "old.json")
    assert "3 kernels here, 3 there: **1 identical SASS**, 1 different, 1 only here, 1 only there." in text
    row = next(line for line in text.splitlines() if line.startswith("| _bwd"))
    assert "registers 128 -> 168" in row and "spill_stores 0 -> 4" in row and "instructions" not in row
    assert "Only here: _new 90" in text and "Only there: _gone 90" in text


def test_compare_refuses_a_report_without_hashes(tmp_path, capsys):
    old = tmp_path / "old.json"
    fact = _fact("_fwd", "bf16 d128", "a" * 16)
    del fact["sass_sha256"]
    old.write_text(json.dumps({"facts": [fact]}))
    assert TOOL["main"](["--compare", str(old), "--output-prefix", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --compare {old}: expected a report of this tool with sass_sha256 per kernel\n"
    assert list(tmp_path.iterdir()) == [old]  # refused before compiling or writing anything
