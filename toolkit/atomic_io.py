"""Atomic file writes without torch (evaluate_gpu.py's CPU path must not import it).

A crash or a full disk never leaves a half-written result: data go to a temporary file beside the
target, which replaces the target only once complete. The file gets the mode a plain open() would
give (0644 under umask 022), not mkstemp's private 0600, so results stay readable on shared machines.
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _default_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only once the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv_atomic(rows: list[dict], fields: list[str] | None, path: str | os.PathLike) -> None:
    """A CSV table with a header: `fields` in that order (keys of a row outside them are left out), or every
    key of any row, in order of appearance, when fields is None."""
    fields = fields if fields is not None else list(dict.fromkeys(key for row in rows for key in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(buf.getvalue(), path)


def savemat_atomic(arrays: dict, path: str | os.PathLike) -> None:
    """scipy.io.savemat through a temporary file (the .mat that test.py hands to evaluate_gpu.py)."""
    import scipy.io
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            scipy.io.savemat(f, arrays)
