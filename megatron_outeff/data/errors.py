"""The one exception type the data pipeline raises for bad input.

Tools catch it and print its message as a single `error: ...` line (no traceback), so every
message must be complete on its own: name the file, prefix or option that is wrong.
"""


class DataError(ValueError):
    """Bad data-pipeline input: missing/unknown file, empty corpus, bad JSON, wrong vocab..."""
