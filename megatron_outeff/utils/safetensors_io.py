"""Reading safetensors files we did not write (Hugging Face directories, checkpoints from elsewhere): never a
pickle, and a file safetensors cannot read is one line naming it (OutEffError), whatever safetensors raised."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Union

from megatron_outeff.errors import OutEffError, one_line


@contextmanager
def unreadable_as_error(path: Union[str, Path]):
    """Any exception inside (safetensors raises its own error types) becomes ``<path>: unreadable
    safetensors file (<its message>)``."""
    try:
        yield
    except Exception as e:
        raise OutEffError(f"{path}: unreadable safetensors file ({one_line(e)})") from None


def check_readable(path: Union[str, Path]) -> None:
    """Its header and size checked, without loading a tensor."""
    from safetensors import safe_open

    with unreadable_as_error(path), safe_open(str(path), framework="pt"):
        pass


def load_tensors(path: Union[str, Path]) -> dict:
    """{name: CPU tensor} of one safetensors file."""
    from safetensors.torch import load_file

    with unreadable_as_error(path):
        return load_file(str(path))


__all__ = ["check_readable", "load_tensors", "unreadable_as_error"]
