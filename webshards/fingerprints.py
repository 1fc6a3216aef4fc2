"""What a data stage read or wrote, described for its lineage record: shards, folders and files, each with a
fingerprint that is cheap at scale, on local paths and fsspec URLs alike.

A fingerprint names content, not a place: a copy of the same shards on ``s3://`` has the same one. The kinds:

- **shards** (a shard spec, a list of ``.tar`` URLs, or a folder holding ``.tar`` files): sha256 over each
  shard's name, tar size in bytes and sample count (``sizes.json``, else its ``_stats.json``); one listing
  and one small file per folder, however large the shards.
- **folder** (an embeddings folder, an eval set): sha256 over each file's relative path and size.
- **file** (a keep list, an input table): sha256 of its bytes (read once, streamed).

Lineage files and hidden files are left out of every listing, so writing the lineage never changes the
fingerprint of what it describes.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from webshards import outputs
from webshards.outputs import Location
from webshards.spec import expand_urls, shard_sample_counts
from webshards.urls import local_path, open_url, redact_url, url_to_fs

METHODS = {
    "shards": "sha256 over each shard's name, tar bytes and sample count (sizes.json or _stats.json)",
    "folder": "sha256 over each file's relative path and size (lineage and hidden files left out)",
    "file": "sha256 of the bytes",
}
LINEAGE_NAMES = ("lineage.json", "_lineage.json")
"""What a listing leaves out: a folder's ``lineage.json`` and ``STEM_lineage.json`` files beside files."""
_CHUNK = 1 << 20


def describe(role: str, value: Any) -> tuple[dict[str, Any], list[str]]:
    """The record of one input or output named ``role`` (a shard spec or list of shard URLs, a folder or a
    file), and the folders or files whose lineage its parents' would be, in order."""
    if isinstance(value, (list, tuple)) or _is_spec(str(value)):
        urls = list(value) if isinstance(value, (list, tuple)) else expand_urls(str(value))
        folders = {posixpath.dirname(str(u)) for u in urls if not str(u).startswith("pipe:")}
        return shards_record(role, urls, _shown(value)), sorted(folders)
    location = outputs.resolve(value)
    if is_folder(location):
        tars = outputs.list_files(location, "*.tar")
        if tars:
            return shards_record(role, [str(t) for t in tars], _shown(location)), [str(location)]
        return folder_record(role, location), [str(location)]
    return file_record(role, location), [str(location)]


def _is_spec(text: str) -> bool:
    """Whether ``text`` names shards: braces, ``::`` sources, ``pipe:``, or a ``.tar`` (a signed URL's
    ``?query`` aside)."""
    return "::" in text or "{" in text or text.startswith("pipe:") or text.partition("?")[0].endswith(".tar")


def _shown(value: Any) -> str:
    """How a record names a location: credentials redacted; a list of shards by its folders and count."""
    if isinstance(value, (list, tuple)):
        folders = sorted({posixpath.dirname(str(u)) for u in value})
        return redact_url(f"{', '.join(folders)} ({len(value)} shards)")
    return redact_url(str(value))


def is_folder(location: Location) -> bool:
    """Whether ``location`` is a folder (on an object store: a prefix holding objects)."""
    if not outputs.is_remote(location):
        return Path(location).is_dir()
    try:
        fs, path = url_to_fs(str(location))
        return fs.isdir(path)
    except (OSError, ValueError, ImportError):  # e.g. a store that may read objects but not list them
        return False


def shards_record(role: str, urls: list[str], shown: str) -> dict[str, Any]:
    """A shards input: how many, their samples (None when a count is unknown) and their fingerprint."""
    urls = [str(u) for u in urls]
    counts, sizes = shard_sample_counts(urls), _byte_sizes(urls)
    digest = hashlib.sha256()
    for url, count, size in zip(urls, counts, sizes):
        digest.update(f"{posixpath.basename(url.partition('?')[0])}\t{size}\t{count}\n".encode())
    known = None if None in counts else sum(counts)
    return {"role": role, "kind": "shards", "location": shown, "shards": len(urls), "samples": known,
            "fingerprint": f"sha256:{digest.hexdigest()}", "method": METHODS["shards"]}  # fmt: skip


def _byte_sizes(urls: list[str]) -> list[int | None]:
    """Each tar's size in bytes: a stat locally, one listing per folder on an object store, None for
    ``pipe:`` and ``http(s)://`` (nothing to list)."""
    listed: dict[str, dict[str, int]] = {}
    sizes = []
    for url in urls:
        path = local_path(url)
        if path is not None:
            sizes.append(os.path.getsize(path) if os.path.isfile(path) else None)
            continue
        folder, name = posixpath.split(url)
        if url.startswith(("pipe:", "http://", "https://")):
            sizes.append(None)
            continue
        if folder not in listed:
            listed[folder] = _listing(folder)
        sizes.append(listed[folder].get(name))
    return sizes


def _listing(folder: str) -> dict[str, int]:
    """Name -> size of a remote folder's objects; empty when it cannot be listed (a reader may be allowed to
    get objects but not to list them: the fingerprint then holds no sizes, and training still starts)."""
    try:
        fs, base = url_to_fs(folder)
        fs.invalidate_cache(base)
        return {posixpath.basename(e["name"]): int(e["size"]) for e in fs.ls(base, detail=True)}
    except (OSError, ValueError, ImportError):
        return {}


def folder_record(role: str, location: Location) -> dict[str, Any]:
    """A folder: its files' count, total bytes and fingerprint."""
    files = sorted(_folder_files(location))
    digest = hashlib.sha256()
    for rel, size in files:
        digest.update(f"{rel}\t{size}\n".encode())
    return {"role": role, "kind": "folder", "location": redact_url(str(location)), "files": len(files),
            "bytes": sum(size for _, size in files), "fingerprint": f"sha256:{digest.hexdigest()}",
            "method": METHODS["folder"]}  # fmt: skip


def _folder_files(location: Location) -> Iterable[tuple[str, int]]:
    """(relative path, size) of every file under ``location`` but lineage and hidden ones."""
    if outputs.is_remote(location):
        fs, base = url_to_fs(str(location))
        base = base.rstrip("/")
        fs.invalidate_cache(base)
        found = ((p[len(base) + 1 :], int(info["size"])) for p, info in fs.find(base, detail=True).items())
    else:
        root = Path(location)
        found = (
            (str(p.relative_to(root).as_posix()), p.stat().st_size) for p in root.rglob("*") if p.is_file()
        )
    for rel, size in found:
        parts = rel.split("/")
        if not any(part.startswith(".") for part in parts) and not parts[-1].endswith(LINEAGE_NAMES):
            yield rel, size


def file_record(role: str, location: Location) -> dict[str, Any]:
    """A file: its size and the sha256 of its bytes (``missing`` when it is not there)."""
    shown = redact_url(str(location))
    if not outputs.exists(location):
        return {"role": role, "kind": "file", "location": shown, "missing": True, "fingerprint": None}
    digest, size = hashlib.sha256(), 0
    with open_url(str(location), retries=0) as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"role": role, "kind": "file", "location": shown, "bytes": size,
            "fingerprint": f"sha256:{digest.hexdigest()}", "method": METHODS["file"]}  # fmt: skip
