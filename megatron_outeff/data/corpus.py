"""Reading raw corpora: input globs, plain text and JSONL documents.

Shared by tokenizer training and preprocessing so that both see exactly the same documents.
Text files give one document per file, or (txt_mode="paragraph") one per block of lines separated
by blank lines; JSONL files give one document per non-blank line, the string under `json_key`.
This is the one JSONL reader of the tools: a bad line (invalid JSON, a missing key, a non-string,
a lone surrogate escape such as "\\ud800", which is valid JSON but not Unicode text) is one
OutEffError naming the file and the line.
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
# JSON may escape a UTF-16 surrogate alone ("\ud800"): json.loads gives a str that no UTF-8 encoder
# (sentencepiece, the tokenizers library, a file write) accepts. Both patterns see the decoded text / raw line.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def expand_input(pattern: Union[str, os.PathLike]) -> List[str]:
    """The files one input names: an existing file is taken literally, even when its name holds glob
    characters (``data[1].jsonl``, ``a*b.txt``); only a name that is no file is a glob (sorted matches).

    The one rule for every tool that takes inputs (preprocessing, tokenizer training, the evaluation
    and export data flags). OutEffError for a directory, a glob matching no file, a missing path.
    """
    pattern = os.fspath(pattern)
    if os.path.isfile(pattern):
        return [pattern]
    if os.path.isdir(pattern):
        raise OutEffError(f"input is a directory, pass files or a glob: {pattern}")
    if glob.has_magic(pattern):
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise OutEffError(f"input glob matches no files: {pattern}")
        return matches
    raise OutEffError(f"input file not found: {pattern}")


def expand_inputs(patterns: Union[str, Sequence[str]]) -> List[str]:
    """Files named by paths or globs (:func:`expand_input`), in the given order (each glob sorted),
    duplicates dropped.

    A glob that matches nothing, or a path that does not exist, is an error (a typo must not
    silently shrink the corpus).
    """
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    files: List[str] = []
    for pattern in patterns:
        matches = expand_input(pattern)
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
                            f"{path}:{lineno}: no key {json_key!r} in JSON record (has {keys}); set --json-key"
                        )
                    text = record[json_key]
                    if not isinstance(text, str):
                        raise OutEffError(f"{path}:{lineno}: {json_key!r} is {type(text).__name__}, not a string")
                    if _SURROGATE_ESCAPE.search(line):  # only a \uD800-\uDFFF escape can make one
                        bad = _LONE_SURROGATE.search(text)
                        if bad:
                            raise OutEffError(
                                f"{path}:{lineno}: {json_key!r} holds a lone surrogate \\u{ord(bad.group()):04x} at "
                                f"character {bad.start()} (a valid JSON escape that is not Unicode text); "
                                "expected UTF-8 text (write the character itself, or a surrogate pair)"
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


def iter_documents(inputs: Union[str, Sequence[str]], json_key: str = "text", txt_mode: str = "file") -> Iterator[str]:
    """All documents of all inputs (paths or globs), in input order."""
    for path in expand_inputs(inputs):
        yield from iter_file_documents(path, json_key=json_key, txt_mode=txt_mode)
