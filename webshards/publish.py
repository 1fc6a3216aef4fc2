"""Publishing a local folder under a URL (a local path or any fsspec URL): every file first, the marker
``_COMPLETE`` last, a manifest ``{...extra, "files": {path: {"size": N, "sha256": HEX}}}``. Publishing again
removes the old marker first (the copy reads as incomplete until the new one lands), then only the files it
listed that the folder lacks. Older remote checkpoint markers listed plain sizes (``{"step": N, "files":
{path: N}}``) and are read too. A remote shard (``outputs.shard_writer``) goes up through ``put_files`` too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from webshards.outputs import Location, exists, join, put_files, read_bytes, remove, write_bytes
from webshards.urls import redact_url

MARKER = "_COMPLETE"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: Path, files: Iterable[str], **extra: Any) -> bytes:
    """The marker's content for ``files`` (paths relative to ``folder``): each one's size and sha256."""
    entries = {rel: {"size": (folder / rel).stat().st_size, "sha256": _sha256(folder / rel)} for rel in files}
    return (json.dumps({**extra, "files": entries}, indent=1) + "\n").encode()


def listed_sizes(marker: bytes, where: str) -> dict[str, int]:
    """Path -> size of each file a marker lists, from today's manifest or an older checkpoint marker's plain
    sizes. Anything else, or a path that would leave the folder, is a ValueError, one line naming ``where``."""
    try:
        files = json.loads(marker)["files"]
        sizes = {rel: int(e["size"] if isinstance(e, dict) else e) for rel, e in files.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise ValueError(f"{redact_url(where)}: not a {MARKER} manifest (no files with sizes)") from None
    for rel in sizes:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ValueError(f"{redact_url(where)}: bad file name {rel!r}")
    return sizes


def publish(folder: Path, url: Location, files: Iterable[str] | None = None, **extra: Any) -> None:
    """Put ``files`` of ``folder`` (default: every file under it) under ``url``, then the marker with
    ``extra`` in it (see the module docstring); a store's failure is its OSError, and no marker is there."""
    every = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    names = sorted(every if files is None else files)
    marker = join(url, MARKER)
    previous = listed_sizes(read_bytes(marker), str(marker)) if exists(marker) else {}
    remove(marker)  # the old copy stops reading as complete before any of its files change
    for rel in sorted(previous.keys() - set(names)):
        remove(join(url, rel))
    put_files(url, folder, names)
    write_bytes(marker, manifest(folder, names, **extra))
