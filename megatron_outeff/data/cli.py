"""Shared behaviour of the data CLIs in tools/: bad input ends in one `error:` line, no traceback."""
from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from .errors import DataError


def run_cli(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> None:
    try:
        code = main(argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code or 0)
