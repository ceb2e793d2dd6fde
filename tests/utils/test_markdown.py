"""utils.markdown.md_row: a label holding "|" stays one cell (the reports' MA / RI / E / max|x| rows lost
their numbers when rendered before)."""

import re

from megatron_outeff.utils.markdown import md_header, md_row


def _cells(row: str) -> list[str]:
    # a GitHub / CommonMark table row splits on every "|" not escaped by a backslash
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row)[1:-1]]


def test_pipes_inside_cells_are_escaped():
    label = "MA = max_c |h_0,c| / median |h| (max layer)"
    row = md_row([label, 34.9, "**8.0**"])
    assert _cells(row) == [label, "34.9", "**8.0**"]


def test_newlines_fold_and_plain_cells_pass_through():
    assert md_row(["a\nb", "c"]) == "| a b | c |"


def test_header_and_separator():
    assert md_header(["", "vanilla", "softmax1"]) == ["| | vanilla | softmax1 |", "|---|---|---|"]
