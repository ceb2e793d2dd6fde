"""Model YAML files of every family: ``configs/model/<family>-<size>.yaml`` (the shipped sizes) or any path.

A model YAML has up to three top-level sections: ``family`` (the model family; OPT when absent, as in the
files of OPT-only releases), ``arch`` (the fields of the family's ArchConfig) and ``parallel`` (a suggested
layout, :class:`ParallelHint`). Every model YAML is read here, by the project's one YAML loader
(``utils/yaml_loader``: duplicate keys refused): the families' ``load_arch_config`` / ``load_parallel_hint``
(models/opt.py, models/llama.py) through :func:`load_arch` / :func:`load_parallel_hint`; the registry
(models/family.py: the shipped files' folder CONFIG_DIR, DEFAULT_FAMILY, ``yaml_family``) reads only the
``family:`` key, with the same loader. No torch, no megatron.

Errors: one-line :class:`megatron_outeff.errors.OutEffError` naming the file or the value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

from megatron_outeff.errors import OutEffError

from .family import CONFIG_DIR, DEFAULT_FAMILY, get_family

SECTIONS = ("family", "arch", "parallel")


@dataclass
class ParallelHint:
    """The ``parallel:`` section of a model YAML: a suggested layout under the training config's own
    ``parallel:`` key names (to copy there), never read by the builder."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    zero_stage: int = 0


# What each hint may be, as a test and in words (a hint is copied into the training config's parallel:, which
# checks it again there).
_HINT_VALUES = {
    "tensor_parallel": (lambda v: v >= 1, "a positive integer"),
    "pipeline_parallel": (lambda v: v >= 1, "a positive integer"),
    "zero_stage": (lambda v: 0 <= v <= 3, "0, 1, 2 or 3"),
}


def arch_from_dict(cls, d, source: str):
    """A config dataclass (an ArchConfig, ParallelHint) from a mapping of a model YAML: a non-mapping, unknown and
    missing keys are one-line errors naming ``source``."""
    if not isinstance(d, dict):
        raise OutEffError(f"{source}: expected a mapping of {cls.__name__} fields, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise OutEffError(f"{source}: unknown key(s) {unknown}; expected a subset of {sorted(known)}")
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in d)
    if missing:
        raise OutEffError(f"{source}: missing required key(s) {missing}")
    return cls(**d)


def shipped_sizes(family: str) -> list[str]:
    """The size names of the shipped ``configs/model/<family>-<size>.yaml`` files, sorted."""
    prefix = f"{family}-"
    return sorted(q.stem[len(prefix) :] for q in CONFIG_DIR.glob(f"{prefix}*.yaml"))


def resolve(name_or_path: Union[str, Path], family: str) -> Path:
    """'125m', 'opt-125m' -> configs/model/opt-125m.yaml (``family``'s prefix optional); a value ending in
    .yaml / .yml or naming an existing file is a path. OutEffError for a missing file or an unknown size."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise OutEffError(f"model config {str(name_or_path)!r}: no such file")
        return p
    prefix = f"{family}-"
    name = str(name_or_path).lower()
    name = name[len(prefix) :] if name.startswith(prefix) else name
    path = CONFIG_DIR / f"{prefix}{name}.yaml"
    if not path.is_file():
        raise OutEffError(
            f"model config {str(name_or_path)!r}: unknown {get_family(family).label} size; "
            f"expected one of {shipped_sizes(family)} or a YAML path"
        )
    return path


def read(name_or_path: Union[str, Path], family: str) -> tuple[Path, dict]:
    """(path, document) of a model YAML of ``family``: a mapping with an ``arch:`` section, no other
    top-level keys than SECTIONS, and ``family:`` (DEFAULT_FAMILY when absent) equal to ``family``."""
    from megatron_outeff.utils.yaml_loader import load_yaml_file

    path = resolve(name_or_path, family)
    doc = load_yaml_file(path)
    if not isinstance(doc, dict) or "arch" not in doc:
        raise OutEffError(f"{path}: expected a mapping with an 'arch:' section")
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise OutEffError(f"{path}: unknown top-level key(s) {unknown}; expected a subset of {sorted(SECTIONS)}")
    if doc.get("family", DEFAULT_FAMILY) != family:
        raise OutEffError(f"{path}: family={doc.get('family')!r}, expected {family!r} here")
    return path, doc


def load_arch(cls, name_or_path) -> Any:
    """The ``cls`` (a family's ArchConfig, its class attribute ``family`` naming the family) of a size name
    or a model YAML path of that family; an instance of ``cls`` passes through."""
    if isinstance(name_or_path, cls):
        return name_or_path
    return _arch(cls, *read(name_or_path, cls.family))


def _arch(cls, path: Path, doc: dict):
    """The ``arch:`` section of the document ``doc`` (read from ``path``) as a ``cls``."""
    return cls.from_dict(doc["arch"], source=f"{path}: arch")


def load_parallel_hint(cls, name_or_path, check_layout: Callable[[Any, int, int], None]) -> ParallelHint:
    """The ``parallel:`` hint of a model YAML of ``cls``'s family (defaults when it has no such section),
    its keys checked and its layout checked against the architecture by ``check_layout(arch, tp, pp)``
    (the family's check_parallel_layout)."""
    path, doc = read(name_or_path, cls.family)
    hint = arch_from_dict(ParallelHint, doc.get("parallel") or {}, f"{path}: parallel")
    for key, (ok, words) in _HINT_VALUES.items():
        value = getattr(hint, key)
        if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
            raise OutEffError(f"{path}: parallel.{key}={value!r}: expected {words}")
    check_layout(_arch(cls, path, doc), hint.tensor_parallel, hint.pipeline_parallel)  # the document read above
    return hint
