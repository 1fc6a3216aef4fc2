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


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path to write to; it becomes ``path`` when the block ends cleanly and is removed otherwise."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are meant to be shared
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (one trailing newline) to ``path`` atomically."""
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def check_settings(path: Path, settings: dict[str, Any], what: str) -> bool:
    """Refuse to resume into a folder whose settings file ``path`` records other ``settings``: a ValueError
    names ``what`` the folder holds and each changed key. Returns whether the file was there."""
    if not path.exists():
        return False
    previous = json.loads(path.read_text())
    changed = [f"{k} {previous.get(k)!r} -> {v!r}" for k, v in settings.items() if previous.get(k) != v]
    if changed:
        raise ValueError(f"{path.parent} holds {what} with other settings ({', '.join(changed)})")
    return True
