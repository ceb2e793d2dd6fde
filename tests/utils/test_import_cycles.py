"""No import cycle inside the package: every ``import`` / ``from ... import`` of a megatron_outeff module by
another, at module level or inside a function, read statically from the sources (a function-level import
still ties the two modules together). Package ``__init__`` re-exports are left out: they import their
children by construction."""

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def module_graph(package_dir: Path) -> tuple[dict, dict]:
    mods = {}
    for f in package_dir.rglob("*.py"):
        name = ".".join(f.relative_to(package_dir.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = f
    edges = collections.defaultdict(set)
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                target = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            edges[name].update(n for n in names if n in mods and n != name)
    return mods, edges


def cycles(mods: dict, edges: dict) -> set:
    found = set()

    def walk(stack):
        for nxt in edges[stack[-1]]:
            if nxt in stack:
                cyc = stack[stack.index(nxt) :]
                i = cyc.index(min(cyc))
                found.add(tuple(cyc[i:] + cyc[:i]))
            elif len(stack) < 16:
                walk(stack + [nxt])

    for m in mods:
        walk([m])
    return {c for c in found if not any(mods[m].name == "__init__.py" for m in c)}


def test_the_detector_sees_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import y\n")
    assert cycles(*module_graph(pkg)) == {("pkg.a", "pkg.b")}


def test_no_import_cycle_in_the_package():
    found = cycles(*module_graph(ROOT / "megatron_outeff"))
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in sorted(found))
