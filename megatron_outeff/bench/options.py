"""The command-line options every benchmark shares (tools/bench_*.py). Imports no torch, so that a
benchmark's --help and its bad-input errors stay instant."""

from __future__ import annotations

from megatron_outeff.utils.cli import output_file


def add_output_arguments(parser, json_default: str = "not written", md_default: str = "not written") -> None:
    """The result-file options of every benchmark: ``--output-json`` (the :class:`Report` file, rewritten
    after every step) and ``--output-md`` (its Markdown table, rewritten with it). ``json_default`` /
    ``md_default``: what the benchmark does without the option, for the help text (each script decides)."""
    parser.add_argument(
        "--output-json",
        type=output_file,
        default=None,
        help=f"the results as JSON, rewritten after every step (default: {json_default})",
    )
    parser.add_argument(
        "--output-md", type=output_file, default=None, help=f"the results as a Markdown table (default: {md_default})"
    )
