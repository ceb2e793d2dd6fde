"""Reading raw corpora: input globs, plain text and JSONL documents.

Shared by tokenizer training and preprocessing so that both see exactly the same documents.
Text files give one document per file, or (txt_mode="paragraph") one per block of lines separated
by blank lines; JSONL files give one document per non-blank line, the string under `json_key`.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterator, List, Sequence, Union

from megatron_outeff.errors import OutEffError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TXT_MODES = ("file", "paragraph")
_BLANK_LINES = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def expand_inputs(patterns: Union[str, Sequence[str]]) -> List[str]:
    """Files named by paths or globs, in the given order (each glob sorted), duplicates dropped.

    A glob that matches nothing, or a path that does not exist, is an error (a typo must not
    silently shrink the corpus).
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: List[str] = []
    for pattern in map(os.fspath, patterns):
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise OutEffError(f"input glob matches no files: {pattern}")
        elif os.path.isfile(pattern):
            matches = [pattern]
        elif os.path.isdir(pattern):
            raise OutEffError(f"input is a directory, pass files or a glob: {pattern}")
        else:
            raise OutEffError(f"input file not found: {pattern}")
        for m in matches:
            if m not in files:
                files.append(m)
    if not files:
        raise OutEffError("no input files given")
    return files


def is_jsonl(path: str) -> bool:
    return path.lower().endswith(JSONL_SUFFIXES)


def _read_text(path: str) -> str:
    # newline="" keeps \r\n and lone \r as written: the data must be exactly the file's text.
    with open(path, "r", encoding="utf-8", newline="") as f:
        return f.read()


def iter_file_documents(path: str, json_key: str = "text", txt_mode: str = "file") -> Iterator[str]:
    """Documents of one file (see module doc). Empty / whitespace-only documents are skipped."""
    if txt_mode not in TXT_MODES:
        raise OutEffError(f"unknown txt mode {txt_mode!r} (choose from {', '.join(TXT_MODES)})")
    try:
        if is_jsonl(path):
            with open(path, "r", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise OutEffError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                    if not isinstance(record, dict) or json_key not in record:
                        keys = list(record) if isinstance(record, dict) else type(record).__name__
                        raise OutEffError(
                            f"{path}:{lineno}: no key {json_key!r} in JSON record (has {keys}); "
                            "set --json-key"
                        )
                    text = record[json_key]
                    if not isinstance(text, str):
                        raise OutEffError(
                            f"{path}:{lineno}: {json_key!r} is {type(text).__name__}, not a string"
                        )
                    if text.strip():
                        yield text
        else:
            text = _read_text(path)
            if txt_mode == "file":
                if text.strip():
                    yield text
            else:
                for block in _BLANK_LINES.split(text):
                    block = block.strip("\r\n")
                    if block.strip():
                        yield block
    except UnicodeDecodeError as e:
        raise OutEffError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def iter_documents(
    inputs: Union[str, Sequence[str]], json_key: str = "text", txt_mode: str = "file"
) -> Iterator[str]:
    """All documents of all inputs (paths or globs), in input order."""
    for path in expand_inputs(inputs):
        yield from iter_file_documents(path, json_key=json_key, txt_mode=txt_mode)
