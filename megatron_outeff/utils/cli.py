"""What every command-line tool shares: bad input ends in ONE line on stderr and exit code 2.

    OneLineArgumentParser     argparse with a one-line ``error: ... (see --help)`` instead of usage + error
    positive_int, nonnegative_int, positive_float
                              argparse ``type=`` checkers naming the bad value and what was expected
    input_file                an existing, non-empty regular file (not a directory)
    input_text_file           the same, and UTF-8 text
    input_dir                 an existing directory
    output_file               a file path to write (not an existing directory)
    first_line(exc)           an exception's message as one line

Light on purpose (argparse only): the tools answer --help and bad options before importing torch,
megatron-core or transformers.
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["OneLineArgumentParser", "first_line", "input_dir", "input_file", "input_text_file", "nonnegative_int", "output_file",
           "positive_float", "positive_int"]


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own code), no usage dump
        print(f"error: {' '.join(str(message).split())} (see --help)", file=sys.stderr, flush=True)
        raise SystemExit(2)


def first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


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


def input_file(text: str) -> str:
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: is a directory, expected a file")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if os.path.getsize(text) == 0:
        raise argparse.ArgumentTypeError(f"{text}: is empty, expected a non-empty file")
    return text


def input_dir(text: str) -> str:
    if os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: is a file, expected a directory")
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: no such directory")
    return text


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
