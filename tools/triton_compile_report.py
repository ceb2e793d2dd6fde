"""Compile-level facts of every Triton flash-attention launch for A100 (sm_80) and H100 / H200 (sm_90),
on a machine without a GPU.

Every kernel specialisation x candidate config the launcher can pick (``megatron_outeff.ops.
triton_compile.flash_items``: fp16 / bf16 / fp32, head dims 32, 64, 80 (padded to 128) and 128, every
flag on and every flag off; plus, for the record, the dK/dV kernel with dQ by atomics, which only
OUTEFF_FLASH_DQ=atomic selects) is compiled exactly as Triton's runtime would
specialise it, and its dynamic shared memory, registers, stack, spill instructions (STL / LDL),
matrix instructions (HGMMA = wgmma, HMMA = mma.sync) and SASS instruction count are recorded.
Nothing is timed: these are the facts a kernel's speed depends on, not its speed.

    python tools/triton_compile_report.py                         # both architectures
    python tools/triton_compile_report.py --arch 90 --workers 2 --output-prefix /tmp/report
    python tools/triton_compile_report.py --output-prefix /tmp/after --compare /tmp/before.json
Writes PREFIX.json (every compiled kernel) and PREFIX.md (one table per architecture), default
tools/results/flash_compile_report.*; prints one progress line per compiled launch. ``--compare OLD.json``
(a report of another revision, same Triton): the kernels whose SASS is identical (``sass_sha256``), those
that differ with the facts that changed, and those only one report has; written as PREFIX.compare.md too.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys

from megatron_outeff.errors import OutEffError
from megatron_outeff.utils.cli import OneLineArgumentParser, command, input_text_file, positive_int
from megatron_outeff.utils.markdown import md_header, md_row

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOMIC_CASES = tuple(("bfloat16", d, f) for d in (64, 128) for f in ("all", "none"))


def _markdown(report: dict) -> str:
    from megatron_outeff.ops.triton_compile import FAMILY_SHARED_MEMORY_LIMIT

    lines = [
        "# Flash-attention kernels compiled ahead of time (no GPU)",
        "",
        f"Command: `{report['command']}`  ",
        f"Date: {report['date']}; triton {report['triton']}, torch "
        f"{report['torch']}, Python {report['python']}; load average before / after: {report['load_before']} / "
        f"{report['load_after']} (compile seconds are wall-clock on a shared machine; ~0: from Triton's cache)",
        "",
        "Columns: shared = dynamic shared memory per block (KiB); regs = registers per thread; stack / STL / "
        "LDL = stack frame (bytes) and spill store / load instructions (our kernels have no local arrays, "
        "so any of them is a spill); wgmma / mma = Hopper warpgroup (HGMMA) and warp-level (HMMA) matrix "
        "instructions in the SASS; instr = SASS instructions. Specialisation: input dtype, head-dim tile, "
        "the constexpr flags that are on, [flag set (all: every flag on and GQA; none: no flag, MHA), dQ "
        "structure, head dim].",
        "",
    ]
    for arch in report["archs"]:
        facts = [f for f in report["facts"] if f["arch"] == arch]
        limit = FAMILY_SHARED_MEMORY_LIMIT[arch] / 1024
        spills = [
            f
            for f in facts
            if (f["spill_stores"] or f["spill_loads"] or f["stack_bytes"])
            and "not a candidate" not in f["specialisation"]
        ]
        lines += [
            f"## sm_{arch} ({len(facts)} compiled kernels; shared-memory limit {limit:.0f} KiB"
            + (", sm_86 / sm_89's: one table serves sm_80-89" if arch == 80 else "")
            + ")",
            "",
            f"Largest shared memory: {max(f['shared_bytes'] for f in facts) / 1024:.1f} KiB; kernels with "
            f"spills (launcher candidates; OUTEFF_FLASH_DQ=atomic included): {len(spills)} "
            f"({', '.join(sorted({f['specialisation'].split()[0] for f in spills})) or '-'}).",
            "",
            "| kernel | config | specialisation | shared KiB | regs | stack | STL | LDL | wgmma | mma | instr | s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for f in sorted(facts, key=lambda f: (f["kernel"], f["specialisation"], f["config"])):
            lines.append(
                f"| {f['kernel']} | {f['config']} | {f['specialisation']} | {f['shared_bytes'] / 1024:.1f} | "
                f"{f['registers']} | {f['stack_bytes']} | {f['spill_stores']} | {f['spill_loads']} | "
                f"{f['wgmma']} | {f['mma']} | {f['instructions']} | {f['compile_s']} |"
            )
        lines.append("")
    return "\n".join(lines)


def _atomic_wgmma_evidence(arch, progress):
    """The dK/dV kernel with dQ by atomics at 64-row query steps, the smallest that puts the dQ product
    on wgmma (bf16, every flag on): why DEFAULT_DQ_MODE is "pass" (flash_attention.py). Compiled in this
    process with the candidate table patched; never picked by the launcher."""
    from megatron_outeff.ops import flash_attention as fa
    from megatron_outeff.ops.triton_compile import compile_flash, flash_items

    out = []
    for bd in (64, 128):
        entry = fa._TABLE[(arch, bd, False)]
        saved = entry["bwd"]
        entry["bwd"] = (fa._cfg(64, 128, 8, 3), fa._cfg(64, 64, 8, 3), fa._cfg(64, 64, 4, 3))
        try:
            items = flash_items(arch, cases=(("bfloat16", bd, "all"),), dq_modes=("atomic",))
            facts = compile_flash(arch, workers=1, progress=progress, items=items)
        finally:
            entry["bwd"] = saved
        for f in facts:
            f.specialisation += " (not a candidate: 64-row query steps)"
        out += facts
    return out


def _read_report(path: str) -> dict:
    """The report at ``path`` (--compare), each record checked as a KernelFacts with a SASS hash, before
    anything is compiled or written; one-line OutEffError otherwise."""
    from megatron_outeff.ops.triton_compile import KernelFacts

    with open(path, encoding="utf-8") as f:  # UTF-8 checked by the option's type
        try:
            report = json.load(f)
        except json.JSONDecodeError as e:
            raise OutEffError(f"--compare {path}: not JSON ({e.msg} at line {e.lineno})") from None
    expected = f"--compare {path}: expected a report of this tool (facts: kernel records with sass_sha256)"
    facts = report.get("facts") if isinstance(report, dict) else None
    if not isinstance(facts, list) or not facts or not all(isinstance(x, dict) for x in facts):
        raise OutEffError(expected)
    for i, x in enumerate(facts):
        try:
            record = KernelFacts(**x)
        except TypeError as e:  # a missing or unknown field
            raise OutEffError(f"{expected}; facts[{i}]: {e}") from None
        if len(record.sass_sha256) != 16:
            raise OutEffError(f"{expected}; facts[{i}] has sass_sha256={record.sass_sha256!r}")
    return report


def compare_reports(old: dict, new: dict, old_name: str) -> str:
    """Markdown: how many kernels of ``new`` have the same SASS as in ``old`` (matched by kernel, arch,
    config and specialisation), the facts that changed in the others, and the kernels only one report has."""
    from megatron_outeff.ops.triton_compile import KernelFacts

    def by_key(report):
        return {KernelFacts(**x).key: x for x in report["facts"]}

    a, b = by_key(old), by_key(new)
    same = {k for k in b if k in a and a[k]["sass_sha256"] == b[k]["sass_sha256"]}
    changed = [k for k in b if k in a and k not in same]
    facts = ("shared_bytes", "registers", "stack_bytes", "spill_stores", "spill_loads", "wgmma", "mma", "instructions")
    lines = [
        f"# SASS compared with {old_name}",
        "",
        f"triton {old.get('triton')} -> {new.get('triton')}; {len(b)} kernels here, {len(a)} there: "
        f"**{len(same)} identical SASS**, {len(changed)} different, {len(set(b) - set(a))} only here, "
        f"{len(set(a) - set(b))} only there.",
        "",
    ]
    if changed:
        lines += md_header(["kernel", "arch", "config", "specialisation", "facts that changed (old -> new)"])
        for k in changed:
            delta = ", ".join(f"{n} {a[k][n]} -> {b[k][n]}" for n in facts if a[k][n] != b[k][n]) or "none (code only)"
            lines.append(md_row([*map(str, k), delta]))
    for title, keys in (("Only here", set(b) - set(a)), ("Only there", set(a) - set(b))):
        if keys:
            lines += ["", f"{title}: " + "; ".join(" ".join(map(str, k)) for k in sorted(keys))]
    return "\n".join(lines) + "\n"


@command
def main(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--arch",
        type=int,
        nargs="+",
        choices=(80, 90),
        default=[80, 90],
        help="compute capabilities to compile for (default: 80 90)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=min(2, os.cpu_count() or 1),
        help="compile processes (default: min(2, CPUs))",
    )
    p.add_argument(
        "--no-atomic-dq",
        dest="with_atomic_dq",
        action="store_false",
        help="skip the dK/dV kernel with dQ by atomics (OUTEFF_FLASH_DQ=atomic; bf16, d 64 and 128)",
    )
    p.add_argument(
        "--output-prefix",
        default=os.path.join(ROOT, "tools", "results", "flash_compile_report"),
        help="writes PREFIX.json and PREFIX.md",
    )
    p.add_argument(
        "--compare", type=input_text_file, default=None, metavar="OLD.json", help="a report to compare the SASS with"
    )
    args = p.parse_args(argv)
    old = _read_report(args.compare) if args.compare else None
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    import torch
    import triton

    from megatron_outeff.ops.triton_compile import compile_flash, flash_items

    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    facts = []
    for arch in args.arch:

        def progress(done, total, got, arch=arch):
            worst = max(got, key=lambda f: f.spill_stores)
            print(
                f"[sm_{arch} {done}/{total}] {worst.kernel} {worst.specialisation}: "
                + "; ".join(
                    f"{f.config} {f.shared_bytes / 1024:.0f}K {f.registers}r {f.spill_stores}stl {f.wgmma}wg {f.mma}mma"
                    for f in got
                ),
                flush=True,
            )

        items = flash_items(arch)
        if args.with_atomic_dq:  # the 5-product structure (OUTEFF_FLASH_DQ=atomic), for the record
            items += flash_items(arch, cases=ATOMIC_CASES, dq_modes=("atomic",))
        facts += [f.as_dict() for f in compile_flash(arch, workers=args.workers, progress=progress, items=items)]
        if args.with_atomic_dq and arch == 90:
            facts += [f.as_dict() for f in _atomic_wgmma_evidence(arch, progress)]
    report = {
        "command": "python tools/triton_compile_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_before": load_before,
        "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "archs": args.arch,
        "facts": facts,
    }
    with open(args.output_prefix + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.output_prefix + ".md", "w") as f:
        f.write(_markdown(report))
    print(f"wrote {args.output_prefix}.json and .md ({len(facts)} kernels)")
    if old is not None:
        text = compare_reports(old, report, args.compare)
        with open(args.output_prefix + ".compare.md", "w") as f:
            f.write(text)
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
