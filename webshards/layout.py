"""Reading and writing shards in the img2dataset layout: the one place that knows it (``pretrain`` reads
and ``data_tools`` writes through it).

A shard ``{shard:05d}`` in a folder is three files, plus a folder-wide ``sizes.json``::

    00000.tar          members KEY.jpg, KEY.txt, KEY.json (+ any extra extensions, e.g. KEY.cls)
    00000.parquet      one row per input row, failures included
    00000_stats.json   counts per status; written last, so its presence marks the shard complete

Every file is written under a temporary name in the same folder and renamed, so a reader never sees a
half-written file under a final name.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from webshards.atomic import temp_path, write_json_atomic

log = logging.getLogger("webshards")

SUCCESS = "success"
FAILURE_STATUSES = ("failed_to_download", "failed_to_resize", "failed_to_decode", "missing_caption")
"""Why an input row produced no sample: img2dataset's three, and `missing_caption` (an image without a
caption, skipped unless `data-tools build --missing-caption keep`)."""
SOURCE_FIELDS = ("url", "path")
SIZES_FILE = "sizes.json"

_SHARD_TAR = re.compile(r"^(\d{5})\.tar$")
# Same split as webdataset: the key is everything before the first dot of the file name.
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")

PARQUET_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uid", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("url", pa.string()),
        ("path", pa.string()),
    ]
)


def make_uid(*parts: str) -> str:
    """A stable 32-hex id for a sample, derived from the parts that identify it (e.g. its URL)."""
    return hashlib.md5("\x1f".join(parts).encode("utf-8")).hexdigest()


def key_for(shard_id: int, index: int, index_digits: int = 4) -> str:
    """The img2dataset sample key: shard id (5 digits) then the index in the shard, zero padded."""
    if not 0 <= index < 10**index_digits:
        raise ValueError(f"index {index} does not fit in {index_digits} digits")
    return f"{shard_id:05d}{index:0{index_digits}d}"


def shard_name(shard_id: int) -> str:
    """The file name stem of a shard, e.g. ``00003``."""
    return f"{shard_id:05d}"


def stats_name(shard: str) -> str:
    """The ``_stats.json`` file name of a shard, given its stem or its tar's name (``00003[.tar]``)."""
    return f"{shard.removesuffix('.tar')}_stats.json"


def is_complete(output_dir: str | Path, shard_id: int) -> bool:
    """Whether the shard was fully written (its ``_stats.json`` exists)."""
    return (Path(output_dir) / stats_name(shard_name(shard_id))).exists()


def _source_of(fields: Mapping[str, Any]) -> dict[str, str | None]:
    """The ``url``/``path`` pair of a sample; at least one must be given."""
    source = {name: fields.get(name) for name in SOURCE_FIELDS}
    if all(value is None for value in source.values()):
        raise ValueError(f"a sample needs its source: one of {SOURCE_FIELDS}")
    return source


def _temp_file(folder: Path, prefix: str) -> tuple[BinaryIO, Path]:
    """A new temp file in ``folder`` (so renaming it into place is atomic), readable like any output."""
    tmp = temp_path(folder / prefix)
    return open(tmp, "wb"), tmp  # noqa: SIM115 - the caller closes it


def _sample_record(key: str, image_bytes: bytes, caption: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The KEY.json of a successful sample: ``meta`` plus the contract fields measured from the bytes."""
    source = _source_of(meta)
    with Image.open(io.BytesIO(image_bytes)) as image:  # reads the header only
        width, height = image.size
    return {
        **meta,
        "key": key,
        "uid": meta.get("uid") or make_uid(*(v for v in source.values() if v)),
        "caption": caption,
        "width": width,
        "height": height,
        "original_width": meta.get("original_width", width),
        "original_height": meta.get("original_height", height),
        "sha256": hashlib.sha256(image_bytes).hexdigest(),
        "status": SUCCESS,
        "error_message": None,
    }


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=None, sort_keys=False).encode("utf-8")


class ShardWriter:
    """Write one shard; files appear under their final names only on a clean ``close()``.

    Use as a context manager: leaving it with an exception removes the temp files and leaves nothing
    under a final name. Tar members carry fixed metadata, so the same samples give the same bytes.
    """

    def __init__(self, output_dir: str | Path, shard_id: int) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.shard_id = shard_id
        self.name = shard_name(shard_id)
        self.rows: list[dict[str, Any]] = []
        self.start_time = time.time()
        self._file, tmp = _temp_file(self.output_dir, f"{self.name}.tar")
        self._tmp_paths = [tmp]
        # Held open across add() calls; close() and abort() close it.
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(
        self,
        key: str,
        image_bytes: bytes,
        caption: str,
        meta: Mapping[str, Any],
        ext: str = "jpg",
        extras: Mapping[str, bytes | str] | None = None,
    ) -> dict[str, Any]:
        """Add a successful sample: KEY.{ext}, KEY.txt, KEY.json and any ``extras`` (extension → data).

        ``meta`` must hold the source (``url`` or ``path``); it may set ``uid`` and the original size,
        and everything in it is kept in KEY.json. Returns the KEY.json record.
        """
        record = _sample_record(key, image_bytes, caption, meta)
        self._add_member(f"{key}.{ext}", image_bytes)
        self._add_member(f"{key}.txt", caption.encode("utf-8"))
        self._add_member(f"{key}.json", _json_bytes(record))
        for extension, data in (extras or {}).items():
            self._add_member(f"{key}.{extension}", data.encode("utf-8") if isinstance(data, str) else data)
        self.rows.append(self._row(record))
        return record

    def add_failure(
        self,
        key: str,
        uid: str,
        caption: str,
        status: str,
        error_message: str,
        source: Mapping[str, str],
    ) -> None:
        """Record an input row that produced no sample (parquet row only, no tar member).

        ``status`` is one of FAILURE_STATUSES; ``source`` is ``{"url": ...}`` or ``{"path": ...}``.
        """
        if status not in FAILURE_STATUSES:
            raise ValueError(f"status must be one of {FAILURE_STATUSES}, got {status!r}")
        record = {"key": key, "uid": uid, "caption": caption, "status": status}
        self.rows.append(self._row({**record, "error_message": error_message, **_source_of(source)}))

    def close(self) -> None:
        """Finish the shard: tar, then parquet, then ``_stats.json`` last (the completion mark)."""
        if self._closed:
            return
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        parquet_tmp = self._write_temp(".parquet", self._parquet_bytes())
        stats_tmp = self._write_temp("_stats.json", _json_bytes(self.stats()))
        final = {self._tmp_paths[0]: ".tar", parquet_tmp: ".parquet", stats_tmp: "_stats.json"}
        # A shard being rewritten must not look complete while its files are swapped.
        (self.output_dir / f"{self.name}_stats.json").unlink(missing_ok=True)
        for tmp, suffix in final.items():
            os.replace(tmp, self.output_dir / f"{self.name}{suffix}")

    def abort(self) -> None:
        """Drop the shard: close handles and remove every temp file."""
        if self._closed:
            return
        self._closed = True
        try:
            self._tar.close()
        finally:
            self._file.close()
            for tmp in self._tmp_paths:
                tmp.unlink(missing_ok=True)

    def stats(self) -> dict[str, Any]:
        """The ``_stats.json`` content: counts per status and timing."""
        statuses = [row["status"] for row in self.rows]
        end_time = time.time()
        counts = {status: statuses.count(status) for status in FAILURE_STATUSES}
        return {
            "count": len(self.rows),
            "successes": statuses.count(SUCCESS),
            **counts,
            "start_time": self.start_time,
            "end_time": end_time,
            "duration": end_time - self.start_time,
        }

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # fixed metadata keeps the tar bytes reproducible
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def _row(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {name: record.get(name) for name in PARQUET_SCHEMA.names}

    def _parquet_bytes(self) -> bytes:
        table = pa.Table.from_pylist(self.rows, schema=PARQUET_SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        return sink.getvalue()

    def _write_temp(self, suffix: str, data: bytes) -> Path:
        f, tmp = _temp_file(self.output_dir, f"{self.name}{suffix}")
        self._tmp_paths.append(tmp)
        with f:
            f.write(data)
        return tmp


def list_shards(output_dir: str | Path) -> list[Path]:
    """The complete shard tars of a folder (those with a ``_stats.json``), sorted by name."""
    folder = Path(output_dir)
    tars = (p for p in folder.glob("*.tar") if _SHARD_TAR.match(p.name))
    return sorted(p for p in tars if (folder / stats_name(p.name)).exists())


def write_sizes(output_dir: str | Path) -> dict[str, int]:
    """Write ``sizes.json`` ({"00000.tar": successes, ...}) for the complete shards; returns it."""
    folder = Path(output_dir)
    sizes = _sizes_from_stats(folder)
    write_json_atomic(folder / SIZES_FILE, sizes)
    return sizes


def write_sizes_when_complete(output_dir: str | Path, shards: list[Path]) -> bool:
    """Write ``sizes.json`` once every one of ``shards`` exists (the last node or rerun to finish does it);
    returns whether it was written."""
    pending = sum(not shard.exists() for shard in shards)
    if pending:
        log.info("sizes.json not written yet: %d shards are not complete", pending)
        return False
    write_sizes(output_dir)
    return True


def read_sizes(output_dir: str | Path) -> dict[str, int]:
    """Samples per shard tar, from ``sizes.json`` or else from the ``*_stats.json`` files."""
    folder = Path(output_dir)
    sizes_file = folder / SIZES_FILE
    if sizes_file.exists():
        return {name: int(n) for name, n in json.loads(sizes_file.read_text()).items()}
    return _sizes_from_stats(folder)


def describe_shards(folder: Path) -> str:
    """E.g. ``3 complete shards, 250 samples in out/`` (from the ``_stats.json`` files)."""
    sizes = read_sizes(folder)
    return f"{len(sizes)} complete shards, {sum(sizes.values())} samples in {folder}/"


def _sizes_from_stats(folder: Path) -> dict[str, int]:
    sizes = {}
    for tar in list_shards(folder):
        stats = json.loads((folder / stats_name(tar.name)).read_text())
        sizes[tar.name] = int(stats["successes"])
    return sizes


UNSAFE_MEMBER = "unsafe_member_name"
"""Skip reason of a sample whose member name is absolute or climbs out (`../`): never read, never written."""


def _unsafe_name(name: str) -> bool:
    return name.startswith("/") or "\\" in name or ".." in name.split("/")


def iter_shard(
    source: str | Path | BinaryIO,
    decode: bool = True,
    skipped: MutableMapping[str, int] | None = None,
    mark_unsafe: bool = False,
) -> Iterator[dict[str, Any]]:
    """Stream the samples of one tar in order, without loading it whole.

    Members are grouped by key into ``{"__key__": key, "jpg": bytes, "txt": str, "json": dict, ...}``;
    other extensions stay bytes (all of them with ``decode=False``, so a reader can survive bad text).
    ``source`` is a local path or an open binary stream (e.g. fsspec). A sample with a member name that
    is absolute or contains ``..`` is never read: it is left out and counted in ``skipped[UNSAFE_MEMBER]``,
    or with ``mark_unsafe`` stands as ``{"__key__": key, UNSAFE_MEMBER: name}`` (for readers that count
    bad samples by position).
    """
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            yield from iter_shard(f, decode, skipped, mark_unsafe)
        return
    sample: dict[str, Any] = {}
    with tarfile.open(fileobj=source, mode="r|*") as tar:
        for member in tar:
            match = _MEMBER.match(member.name)
            if not member.isfile() or match is None:
                continue
            key, ext = match.groups()
            if sample and sample["__key__"] != key:
                if UNSAFE_MEMBER not in sample or mark_unsafe:
                    yield sample
                sample = {}
            if UNSAFE_MEMBER in sample or _unsafe_name(member.name):
                if not sample:
                    log.warning("skipping sample %r: member name %r is unsafe", key, member.name)
                    if skipped is not None:
                        skipped[UNSAFE_MEMBER] = skipped.get(UNSAFE_MEMBER, 0) + 1
                    sample = {"__key__": key, UNSAFE_MEMBER: member.name}
                continue
            sample["__key__"] = key
            data = tar.extractfile(member).read()
            sample[ext] = _decode_member(ext, data) if decode else data
    if sample and (UNSAFE_MEMBER not in sample or mark_unsafe):
        yield sample


def _decode_member(ext: str, data: bytes) -> Any:
    if ext == "txt":
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    return data
