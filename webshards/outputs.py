"""Output locations that are a local folder or an fsspec URL (``s3://bucket/prefix``): the few file
operations the shard writers need, and a ``ShardWriter`` for either.

Locally every file is written under a temp name and renamed (``atomic``). On an object store one PUT makes
an object appear whole or not at all, so objects need no temp names; what a reader must not see is a shard
without its marker, so a remote shard is staged in a local temp folder and uploaded tar and parquet
first, ``_stats.json`` (the marker) last (``put_files``, as ``publish`` puts a folder's files).

Beyond shards, the multi-phase jobs (embed, filter, dedup) need a few more operations on either kind of
location: ``staged`` (a local temp file that becomes the output whole), listing (``list_files``), removal of a
scratch tree (``remove_tree``), ``.npy`` reads (``load_npy``, and ``npy_rows``, which reads only a row range
of a remote file), parquet reads of some columns and a file's fingerprint for scratch keys. A local path keeps
working exactly as before (the same bytes under the same names).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from webshards import layout
from webshards.atomic import atomic_path, json_bytes, write_atomic
from webshards.layout import SIZES_FILE, ShardWriter, shard_name, stats_name
from webshards.urls import local_path, redact_url, url_to_fs

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
    """``name`` (may hold ``/``) inside ``location``, of the same kind (in a URL's path, before any ``?query``)."""
    if not is_remote(location):
        return Path(local_path(str(location))) / name
    path, mark, query = str(location).partition("?")
    return f"{path.rstrip('/')}/{name}{mark}{query}"


def _fs(location: Location) -> tuple:
    """The fsspec filesystem of a URL and the path in it; a URL that cannot be reached (an unknown
    protocol, its package not installed) is a ValueError naming it."""
    try:
        return url_to_fs(str(location))
    except (ImportError, ValueError) as error:
        raise ValueError(redact_url(f"cannot use {location}: {error}")) from None


def name(location: Location) -> str:
    """The last part of ``location`` (a file or folder name)."""
    return Path(location).name if not is_remote(location) else str(location).rstrip("/").rsplit("/", 1)[-1]


def with_name(location: Location, new: str) -> Location:
    """``location`` with its last part replaced by ``new``: a file beside it, of the same kind."""
    if not is_remote(location):
        return Path(location).with_name(new)
    return f"{str(location).rstrip('/').rsplit('/', 1)[0]}/{new}"


def beside(location: Location, suffix: str) -> Location:
    """The file next to ``location`` named by its stem and ``suffix`` (``00007.parquet`` beside
    ``00007.tar``, ``keep.npy`` beside ``keep.parquet``), of the same kind."""
    return with_name(location, Path(name(location)).stem + suffix)


def exists(location: Location) -> bool:
    """Whether the file is there; remotely asked of the store each time (another node may have written
    it since this process last listed the folder)."""
    if not is_remote(location):
        return Path(location).exists()
    fs, path = _fs(location)
    fs.invalidate_cache(path)
    return fs.exists(path)


def read_bytes(location: Location) -> bytes:
    if not is_remote(location):
        return Path(location).read_bytes()
    fs, path = _fs(location)
    return fs.cat_file(path)


def write_bytes(location: Location, data: bytes) -> None:
    """Write ``data`` whole: locally under a temp name then renamed, remotely in one PUT."""
    if not is_remote(location):
        write_atomic(location, data)
        return
    fs, path = _fs(location)
    fs.pipe_file(path, data)


def write_json(location: Location, obj: Any) -> None:
    """``obj`` as indented JSON, written whole (the same bytes as ``atomic.write_json_atomic``)."""
    write_bytes(location, json_bytes(obj))


def remove(location: Location) -> None:
    """Remove a file if it is there."""
    if not is_remote(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = _fs(location)
    if fs.exists(path):
        fs.rm_file(path)


def make_folder(location: Location) -> None:
    """Create a local folder (with parents); an object store needs none."""
    if not is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)


def read_parquet(location: Location, columns: list[str] | None = None) -> Any:
    """A parquet file at ``location`` as a pyarrow table (only ``columns`` if given: remotely, ranged
    reads of just those column chunks)."""
    import pyarrow.parquet as pq

    if not is_remote(location):
        return pq.read_table(location, columns=columns)
    fs, path = _fs(location)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def parquet_rows(location: Location) -> int:
    """The row count of a parquet file, from its footer."""
    import pyarrow.parquet as pq

    if not is_remote(location):
        return pq.read_metadata(location).num_rows
    fs, path = _fs(location)
    with fs.open(path, "rb") as f:
        return pq.read_metadata(f).num_rows


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
        remove(join(output, stats_name(name)))  # a shard being rewritten must not look complete meanwhile
        put_files(output, Path(staging), [f"{name}.tar", f"{name}.parquet", stats_name(name)])


def put_files(location: Location, folder: Path, names: list[str]) -> None:
    """Upload each of ``names`` (paths relative to ``folder``) to the same path under ``location``, in order."""
    fs, base = _fs(location)
    for rel in names:
        fs.makedirs(f"{base}/{rel}".rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(folder / rel), f"{base}/{rel}")


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
    fs, base = _fs(output)
    base = base.rstrip("/")
    if fs.exists(f"{base}/{SIZES_FILE}"):
        sizes = json.loads(fs.cat_file(f"{base}/{SIZES_FILE}"))
    else:
        markers = fs.glob(f"{base}/[0-9][0-9][0-9][0-9][0-9]_stats.json")
        sizes = {marker: json.loads(fs.cat_file(marker))["successes"] for marker in markers}
    return f"{len(sizes)} complete shards, {sum(sizes.values())} samples in {str(output).rstrip('/')}/"


def status_counts(output: Location) -> dict[str, int]:
    """Input rows by status over the complete shards of ``output`` (their ``_stats.json``): ``success`` and
    each of ``layout.FAILURE_STATUSES``."""
    counts = dict.fromkeys((layout.SUCCESS, *layout.FAILURE_STATUSES), 0)
    for marker in list_files(output, "[0-9][0-9][0-9][0-9][0-9]_stats.json"):
        stats = json.loads(read_bytes(marker))
        counts[layout.SUCCESS] += int(stats.get("successes", 0))
        for status in layout.FAILURE_STATUSES:
            counts[status] += int(stats.get(status, 0))
    return counts


@contextlib.contextmanager
def staged(location: Location) -> Iterator[Path]:
    """A local temp path to write ``location``'s file to (a drop-in for ``atomic.atomic_path``): when the
    block ends cleanly it is renamed into place locally, or uploaded in one PUT remotely; on failure it is
    removed, so no half-written file is ever visible under its name."""
    if not is_remote(location):
        with atomic_path(location) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="staged-") as folder:
        tmp = Path(folder) / name(location)
        yield tmp
        fs, path = _fs(location)
        fs.put_file(str(tmp), path)


def save_npy(location: Location, array: Any) -> None:
    """``np.save`` of ``array`` to ``location``, written whole (see ``staged``)."""
    import numpy as np

    with staged(location) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def load_npy(location: Location, mmap: bool = False) -> Any:
    """An ``.npy`` (or ``.npz``) file; locally memory-mapped if ``mmap``, remotely downloaded whole."""
    import numpy as np

    if not is_remote(location):
        return np.load(location, mmap_mode="r" if mmap else None)
    return np.load(io.BytesIO(read_bytes(location)))


def npy_shape(location: Location) -> tuple[int, ...]:
    """The array shape of an ``.npy`` file, from its header (remotely: only the first bytes are read)."""
    if not is_remote(location):
        return load_npy(location, mmap=True).shape
    fs, path = _fs(location)
    with fs.open(path, "rb", cache_type="readahead", block_size=1 << 16) as f:
        return _npy_header(f, location)[0]


def npy_rows(location: Location, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of an ``.npy`` file: locally through a memory map, remotely by reading the header
    and then only those rows' byte range (not the whole file)."""
    import numpy as np

    if not is_remote(location):
        return np.array(load_npy(location, mmap=True)[start:stop])
    fs, path = _fs(location)
    with fs.open(path, "rb", cache_type="readahead", block_size=1 << 16) as f:  # header: one request
        shape, dtype = _npy_header(f, location)
        row_bytes = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        f.seek(f.tell() + start * row_bytes)
        data = f.read((stop - start) * row_bytes)
    return np.frombuffer(data, dtype=dtype).reshape((stop - start, *shape[1:])).copy()


def _npy_header(f: Any, location: Location) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) of the C-ordered ``.npy`` file open at its start; leaves ``f`` at the first row."""
    from numpy.lib import format as npy_format

    version = npy_format.read_magic(f)
    read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran:
        raise ValueError(f"{redact_url(str(location))}: Fortran-ordered arrays are not read by rows")
    return shape, dtype


def list_files(folder: Location, pattern: str) -> list[Location]:
    """The files matching the glob ``pattern`` (may hold ``/``) under ``folder``, sorted by name, each of
    the same kind as ``folder`` (a ``Path`` or a URL)."""
    if not is_remote(folder):
        return sorted(p for p in Path(folder).glob(pattern) if p.is_file())
    fs, base = _fs(folder)
    base = base.rstrip("/")
    fs.invalidate_cache(base)
    found = fs.glob(f"{base}/{pattern}")
    return sorted(join(resolve(folder), p[len(base) + 1 :]) for p in found if p.startswith(f"{base}/"))


def remove_tree(location: Location) -> None:
    """Remove a folder and everything under it, if it is there (remotely: every object of the prefix)."""
    if not is_remote(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = _fs(location)
    fs.invalidate_cache(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path.rstrip("/"), recursive=True)


def fingerprint(location: Location) -> tuple[str, int, int | str]:
    """Name, size and version of a file (locally its mtime in ns, remotely its ETag or modification time),
    so scratch files computed from an input are not reused once it changes."""
    if not is_remote(location):
        st = Path(location).stat()
        return str(location), st.st_size, st.st_mtime_ns
    fs, path = _fs(location)
    info = fs.info(path)
    version = info.get("ETag") or info.get("LastModified") or info.get("mtime") or ""
    return str(location), int(info["size"]), str(version)
