"""Output locations that are a local folder or an fsspec URL (``s3://bucket/prefix``): the few file
operations the shard writers need, and a ``ShardWriter`` for either.

Locally every file is written under a temp name and renamed (``atomic``). On an object store one PUT makes
an object appear whole or not at all, so objects need no temp names; what a reader must not see is a shard
without its marker, so a remote shard is staged in a local temp folder and uploaded tar and parquet
first, ``_stats.json`` (the marker) last.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from webshards import layout
from webshards.atomic import json_bytes, write_atomic
from webshards.layout import SIZES_FILE, ShardWriter, shard_name, stats_name
from webshards.urls import local_path, url_to_fs

log = logging.getLogger("webshards")

Location = str | Path
"""A local path or an fsspec URL."""


def is_remote(location: Location) -> bool:
    """Whether ``location`` is an fsspec URL rather than a local path (``file://`` counts as local)."""
    return local_path(str(location)) is None


def resolve(location: Location) -> Location:
    """A local path made absolute (a ``Path``), a URL without its trailing slash (a ``str``)."""
    if is_remote(location):
        return str(location).rstrip("/")
    return Path(local_path(str(location))).resolve()


def join(location: Location, name: str) -> Location:
    """``name`` (may hold ``/``) inside ``location``, of the same kind."""
    return f"{location}/{name}" if is_remote(location) else Path(location) / name


def exists(location: Location) -> bool:
    if not is_remote(location):
        return Path(location).exists()
    fs, path = url_to_fs(str(location))
    return fs.exists(path)


def read_bytes(location: Location) -> bytes:
    if not is_remote(location):
        return Path(location).read_bytes()
    fs, path = url_to_fs(str(location))
    return fs.cat_file(path)


def write_bytes(location: Location, data: bytes) -> None:
    """Write ``data`` whole: locally under a temp name then renamed, remotely in one PUT."""
    if not is_remote(location):
        write_atomic(location, data)
        return
    fs, path = url_to_fs(str(location))
    fs.pipe_file(path, data)


def write_json(location: Location, obj: Any) -> None:
    """``obj`` as indented JSON, written whole (the same bytes as ``atomic.write_json_atomic``)."""
    write_bytes(location, json_bytes(obj))


def remove(location: Location) -> None:
    """Remove a file if it is there."""
    if not is_remote(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = url_to_fs(str(location))
    if fs.exists(path):
        fs.rm_file(path)


def make_folder(location: Location) -> None:
    """Create a local folder (with parents); an object store needs none."""
    if not is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)


def read_parquet(location: Location) -> Any:
    """A parquet file at ``location`` as a pyarrow table."""
    import pyarrow.parquet as pq

    if not is_remote(location):
        return pq.read_table(location)
    return pq.read_table(io.BytesIO(read_bytes(location)))


def write_parquet(location: Location, table: Any) -> None:
    """Write a pyarrow table whole (see ``write_bytes``)."""
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink)
    write_bytes(location, sink.getvalue())


@contextlib.contextmanager
def shard_writer(output: Location, shard_id: int) -> Iterator[ShardWriter]:
    """A ``ShardWriter`` for shard ``shard_id`` of ``output``: locally the writer itself; remotely one on a
    local staging folder whose files are uploaded on success, ``_stats.json`` last (nothing on failure)."""
    if not is_remote(output):
        with ShardWriter(output, shard_id) as writer:
            yield writer
        return
    with tempfile.TemporaryDirectory(prefix="shard-") as staging:
        with ShardWriter(staging, shard_id) as writer:
            yield writer
        name = shard_name(shard_id)
        fs, base = url_to_fs(str(output))
        fs.makedirs(base, exist_ok=True)
        marker = f"{base}/{stats_name(name)}"
        if fs.exists(marker):  # a shard being rewritten must not look complete while its files change
            fs.rm_file(marker)
        for suffix in (".tar", ".parquet", "_stats.json"):
            fs.put_file(str(Path(staging) / f"{name}{suffix}"), f"{base}/{name}{suffix}")


def write_sizes_when_complete(output: Location, markers: list[Location]) -> bool:
    """Write ``sizes.json`` (``{"00000.tar": successes, ...}``) once every one of ``markers`` (the shards'
    ``_stats.json``) exists; returns whether it was written."""
    if not is_remote(output):
        return layout.write_sizes_when_complete(output, [Path(marker) for marker in markers])
    if not all(exists(marker) for marker in markers):
        log.info("sizes.json not written yet: some shards are not complete")
        return False
    sizes = {}
    for marker in markers:
        name = str(marker).rsplit("/", 1)[-1].removesuffix("_stats.json")
        sizes[f"{name}.tar"] = int(json.loads(read_bytes(marker))["successes"])
    write_json(join(output, SIZES_FILE), dict(sorted(sizes.items())))
    return True


def describe_shards(output: Location) -> str:
    """E.g. ``3 complete shards, 250 samples in out/`` (from sizes.json or the ``_stats.json`` markers)."""
    if not is_remote(output):
        return layout.describe_shards(Path(output))
    fs, base = url_to_fs(str(output))
    base = base.rstrip("/")
    if fs.exists(f"{base}/{SIZES_FILE}"):
        sizes = json.loads(fs.cat_file(f"{base}/{SIZES_FILE}"))
    else:
        markers = fs.glob(f"{base}/[0-9][0-9][0-9][0-9][0-9]_stats.json")
        sizes = {marker: json.loads(fs.cat_file(marker))["successes"] for marker in markers}
    return f"{len(sizes)} complete shards, {sum(sizes.values())} samples in {str(output).rstrip('/')}/"
