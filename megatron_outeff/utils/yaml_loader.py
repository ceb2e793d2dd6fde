"""Reading YAML: the one loader for every YAML the product reads (training configs, ``--set`` values,
model architecture files, experiment configs).

    load_yaml(text, source)     the document of ``text`` (PyYAML's SafeLoader: plain data only, no Python
                                objects); ``source`` names it in errors (a file path, ``--set x=...``)
    load_yaml_file(path)        the same for a file (UTF-8)

A mapping that repeats a key is refused: PyYAML (like the YAML 1.1 loaders of most languages) silently
keeps the last value, so a second ``train:`` block replaces the first and drops its keys. The error is
one line ``<source>:<line>: duplicate key 'k' (first at line <l>); expected each key once per mapping``.
Merge keys (``<<: *anchor``) may be overridden by the mapping's own keys, as YAML intends: only keys
written literally in one mapping count. A YAML syntax error is one line too, with its position.
Errors: :class:`megatron_outeff.errors.OutEffError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from megatron_outeff.errors import OutEffError

__all__ = ["load_yaml", "load_yaml_file"]

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _DuplicateKey(Exception):
    def __init__(self, key, line: int, first: int):
        super().__init__(key, line, first)
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader whose mappings refuse a key written twice."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error names it below
                    continue
                line = key_node.start_mark.line + 1
                if first is not None:
                    raise _DuplicateKey(key, line, first)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def load_yaml(text: str, source: str) -> Any:
    """The YAML document of ``text`` (None for an empty one); OutEffError naming ``source`` and the line of a
    duplicate key or a syntax error."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as e:
        raise OutEffError(
            f"{source}:{e.line}: duplicate key {e.key!r} (first at line {e.first}); expected each key once per mapping"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(e, "problem", None) or str(e)
        raise OutEffError(f"{where}: invalid YAML ({' '.join(str(problem).split())})") from None


def load_yaml_file(path) -> Any:
    """:func:`load_yaml` of a UTF-8 file; OutEffError for a missing or non-UTF-8 file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OutEffError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise OutEffError(f"{path}: is a directory, expected a YAML file") from None
    except UnicodeDecodeError as e:
        raise OutEffError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return load_yaml(text, str(path))
