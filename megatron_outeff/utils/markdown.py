"""Markdown tables: the one place that writes a table row (the reports of ``evaluation/``).

md_row(cells)   "| a | b |" with every "|" inside a cell escaped as "\\|", so that labels such as
                "MA = max_c |h_0,c| / median |h|" stay one cell when rendered (GitHub / CommonMark tables)
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["md_header", "md_row"]


def md_row(cells: Iterable[object]) -> str:
    """One Markdown table row of ``cells`` (each str()-ed; "|" escaped, newlines folded to spaces)."""
    texts = (str(c).replace("|", "\\|").replace("\n", " ") for c in cells)
    return "|" + "|".join(f" {t} " if t else " " for t in texts) + "|"  # an empty cell: "| |"


def md_header(cells: Iterable[object]) -> list[str]:
    """The header row of ``cells`` and the separator line under it."""
    cells = list(cells)
    return [md_row(cells), "|" + "---|" * len(cells)]
