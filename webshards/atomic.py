"""Atomic file output: write under a temp name in the same folder, rename into place on success.

A reader (or a resumed job) never sees a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_path(final: Path) -> Path:
    """A new empty file ``.{name}.XXXX.tmp`` beside ``final``: in the same folder, so renaming it onto
    ``final`` is atomic; readable by all, like any output."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are meant to be shared
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path to write to; it becomes ``path`` when the block ends cleanly and is removed otherwise."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_bytes(obj: Any) -> bytes:
    """``obj`` as the project's JSON files hold it: indented, one trailing newline."""
    return (json.dumps(obj, indent=1) + "\n").encode("utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (one trailing newline) to ``path`` atomically."""
    write_atomic(path, json_bytes(obj))
