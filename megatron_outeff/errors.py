"""The project's one error type for bad input, and the one way to add context to an error.

    OutEffError     a ValueError: bad input (a missing, malformed or contradictory file, key, value or
                    option), found before anything is written. Its message is ONE line, complete on its
                    own: it names the bad value and what was expected. Every command-line tool prints
                    it as ``error: <message>`` and exits with code 2 (megatron_outeff.utils.cli.command).
    with_context    re-raise a foreign error (a library's ValueError, a lower layer's message that does
                    not say which input it is about) as an OutEffError ``<where>: <message>``; a message
                    that already starts with ``where`` is not prefixed again.

An OutEffError is re-raised only to add context its message lacks; a complete message travels up
unchanged (no ``model: attention: ...`` piles).
"""

from __future__ import annotations

import re

__all__ = ["OutEffError", "one_line", "with_context"]


class OutEffError(ValueError):
    """Bad input, reported as one line naming the bad value and what was expected (exit code 2)."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (whitespace runs collapsed); its type name if it has none."""
    return " ".join(str(e).split()) or type(e).__name__


def with_context(where: str, e: BaseException) -> OutEffError:
    """An OutEffError ``<where>: <e's message>`` to ``raise ... from None``; the message alone when it
    already names ``where`` first (``where``, ``where.key...``, ``where=...``, ``where: ...``, ``where[...``), so that
    context is never added twice."""
    msg = one_line(e)
    if not where or re.match(re.escape(where) + r"($|[.:=\[])", msg):
        return OutEffError(msg)
    return OutEffError(f"{where}: {msg}")
