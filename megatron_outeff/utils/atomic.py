"""All-or-nothing outputs: a reader never sees a half-written export or checkpoint that looks valid."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from megatron_outeff.errors import OutEffError


def check_empty_output_dir(out_dir) -> Path:
    """``out_dir`` as a Path if it does not exist or is an empty directory; OutEffError otherwise."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutEffError(f"{out_dir}: exists and is not an empty directory; refusing to overwrite")
    return out_dir


@contextlib.contextmanager
def atomic_output_dir(out_dir) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out_dir`` to write into; on success rename it to ``out_dir``.

    ``out_dir`` must be absent or empty (nothing is ever overwritten). On any error, including a
    KeyboardInterrupt, the temporary directory is removed and ``out_dir`` is left as it was. The
    sibling lives in the same parent so the final rename is atomic on one filesystem.
    """
    out_dir = check_empty_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked); rmdir refuses if something appeared meanwhile
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path, text: str) -> None:
    """Replace the file ``path`` with ``text`` all at once: written to ``path.tmp``, fsynced, then renamed
    over ``path`` (os.replace), so a reader or a crash sees the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path) -> None:
    """Make the renames inside directory ``path`` durable (best effort: skipped where a directory cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
