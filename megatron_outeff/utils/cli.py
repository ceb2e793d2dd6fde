"""What every command-line tool shares: bad input ends in ONE line on stderr and exit code 2.

    command                   decorator for a tool's ``main(argv=None) -> int``: an OutEffError (the
                              project's bad-input error, megatron_outeff.errors) becomes one
                              ``error: <message>`` line on stderr and exit code 2; returns the exit code
    quiet_transformers()      no transformers progress bars or warnings on a tool's stderr
    OneLineArgumentParser     argparse with a one-line ``error: ... (see --help)`` instead of usage + error
    positive_int, nonnegative_int, positive_float
                              argparse ``type=`` checkers naming the bad value and what was expected
    input_file                an existing, non-empty regular file (not a directory)
    input_text_file           the same, and UTF-8 text
    input_dir                 an existing directory
    output_file               a file path to write (not an existing directory)
    add_corpus_arguments(p)   the text-corpus input flags (--input, --json-key, --txt-mode) of the tools that
                              read one (megatron_outeff.data's ``inputs``, ``json_key``, ``txt_mode``)

Every tool in tools/ defines its flags in its own ``main(argv)`` decorated with :func:`command` and
ends with ``sys.exit(main())``; the module CLIs (``python -m megatron_outeff.training.train``, ...)
do the same. Tools import the installed package (``launch/setup_env.sh`` installs it editable;
elsewhere ``PYTHONPATH=$PWD``). Outputs are spelled ``--output-dir`` (a directory),
``--output-prefix`` (files PREFIX.*) or ``--output-json`` / ``--output-md`` (one file).

Light on purpose (argparse only): the tools answer --help and bad options before importing torch,
megatron-core or transformers.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, Optional, Sequence

from megatron_outeff.errors import OutEffError, one_line

__all__ = [
    "OneLineArgumentParser",
    "add_corpus_arguments",
    "command",
    "input_dir",
    "input_file",
    "input_text_file",
    "nonnegative_int",
    "output_file",
    "positive_float",
    "positive_int",
    "quiet_transformers",
]

Main = Callable[[Optional[Sequence[str]]], Optional[int]]


def _rank() -> int:
    """This process's rank in a torch.distributed job (0 outside one); torch is not imported for it."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def error_line(message: str) -> None:
    """Print ``error: <message>`` as one line on stderr (rank 0 only in a distributed job: every rank
    fails alike, say it once)."""
    if _rank() == 0:
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def command(main: Main) -> Callable[[Optional[Sequence[str]]], int]:
    """Wrap a tool's ``main(argv=None)`` so that it returns an exit code and never raises for bad input:
    an OutEffError prints one ``error: <message>`` line (stderr) and gives 2; a bad option or value
    (OneLineArgumentParser printed its line) gives argparse's 2, --help 0; Ctrl-C prints
    ``error: interrupted`` and gives 130. Anything else is a bug and keeps its traceback."""

    @functools.wraps(main)
    def run(argv: Optional[Sequence[str]] = None) -> int:
        try:
            return int(main(argv) or 0)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except OutEffError as e:
            error_line(one_line(e))
            return 2
        except KeyboardInterrupt:
            error_line("interrupted")
            return 130

    return run


def quiet_transformers() -> None:
    """stderr is for the one error line: no transformers progress bars (a tool's own [i/n] lines on stdout
    are the progress) and only its errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error and no prefix matching (allow_abbrev=False: a retired flag such as
    ``--out`` must not pass as an abbreviation of ``--output-dir``); sub-commands inherit both."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):  # one line, exit 2 (argparse's own code), no usage dump
        error_line(f"{message} (see --help)")
        raise SystemExit(2)


def _int(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {what}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {what}")
    return value


def positive_int(text: str) -> int:
    return _int(text, 1, "an integer >= 1")


def nonnegative_int(text: str) -> int:
    return _int(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number > 0")
    return value


def _existing(text: str, kind: str) -> str:
    """``text`` if it names an existing ``kind`` ("file" or "directory"); else the error naming what it is."""
    is_kind, other, is_other = (
        (os.path.isfile, "directory", os.path.isdir) if kind == "file" else (os.path.isdir, "file", os.path.isfile)
    )
    if is_other(text):
        raise argparse.ArgumentTypeError(f"{text}: is a {other}, expected a {kind}")
    if not is_kind(text):
        raise argparse.ArgumentTypeError(f"{text}: no such {kind}")
    return text


def input_file(text: str) -> str:
    if os.path.getsize(_existing(text, "file")) == 0:
        raise argparse.ArgumentTypeError(f"{text}: is empty, expected a non-empty file")
    return text


def input_dir(text: str) -> str:
    return _existing(text, "directory")


def output_file(text: str) -> str:
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file path to write")
    return text


def input_text_file(text: str) -> str:
    input_file(text)
    try:
        with open(text, encoding="utf-8") as f:
            f.read()
    except UnicodeDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text


def add_corpus_arguments(parser: argparse.ArgumentParser, *, input_help: str, txt_mode_help: str) -> None:
    """The flags of a tool that reads a text corpus, under the names megatron_outeff.data's readers take:
    ``--input`` (-> ``inputs``: files or quoted globs, in order), ``--json-key``, ``--txt-mode``."""
    parser.add_argument("--input", dest="inputs", nargs="+", required=True, metavar="PATH_OR_GLOB", help=input_help)
    parser.add_argument("--json-key", default="text", help="field holding the text in JSONL (default 'text')")
    parser.add_argument("--txt-mode", choices=["file", "paragraph"], default="file", help=txt_mode_help)
