"""Keep-list algebra (``data-tools keep``): union, intersection and difference of keep lists, with
reshard's meaning of a repeated uid (listed k times: written k times, DataComp's upsampling):

- ``intersect``: the uids in every list, each with its smallest count (what ``reshard --keep A --keep B``
  selects, so the two agree);
- ``union``: the uids in any list, each with its largest count (a list united with itself is itself; lists
  of different uids are simply joined);
- ``subtract``: the uids of the first list that no later list holds, with the first list's count (e.g. a
  keep list minus a decontamination list's removals).

The 32-hex uids are held as 16-byte values with a count, not as Python strings: about 50 bytes per uid of
the largest list while it is read and sorted, plus 24 bytes per distinct uid of the result (some 15 GB
for 300M uids; reshard's ``Counter`` of strings needs ~200 bytes per uid). Inputs are parquet ``uid``
columns or DataComp ``.npy`` arrays, local or fsspec URLs; the output is a parquet keep list sorted by uid
(and with ``fmt="datacomp"`` also DataComp's ``.npy`` beside it).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_tools.filter import KEEP_SCHEMA
from webshards import outputs
from webshards.outputs import Location
from webshards.urls import open_url, redact_url

OPERATIONS = ("union", "intersect", "subtract")
UID = np.dtype("V16")
BATCH = 1 << 20
HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)

Multiset = tuple[np.ndarray, np.ndarray]
"""Sorted distinct uids (``V16``) and how many times each is listed (int64)."""


def read_keep_list(location: Location) -> Multiset:
    """The uids of a keep list with their counts; a ValueError names a missing list or a bad uid."""
    shown = redact_url(str(location))
    if not outputs.exists(location):
        raise ValueError(f"keep list not found: {shown}")
    parts = list(_uid_batches(location, shown))
    values, counts = np.unique(np.concatenate(parts) if parts else np.zeros(0, UID), return_counts=True)
    return values, counts.astype(np.int64)


def _uid_batches(location: Location, shown: str) -> Iterator[np.ndarray]:
    """``V16`` batches of a parquet ``uid`` column or of a DataComp ``.npy`` (u8,u8: high bits first)."""
    if outputs.name(location).endswith(".npy"):
        pairs = outputs.load_npy(location)
        halves = np.empty((len(pairs), 2), dtype=">u8")  # big-endian: byte order is numeric order
        halves[:, 0], halves[:, 1] = (pairs[name] for name in pairs.dtype.names)
        yield halves.view(UID).ravel()
        return
    with open_url(str(location)) as stream:
        parquet = pq.ParquetFile(stream)
        if "uid" not in parquet.schema_arrow.names:
            raise ValueError(f"keep list {shown} has no uid column")
        for batch in parquet.iter_batches(columns=["uid"], batch_size=BATCH):
            yield _pack(batch.column(0).to_pylist(), shown)


def _pack(uids: list[str], shown: str) -> np.ndarray:
    """32-hex uids as ``V16`` values."""
    try:
        raw = bytes.fromhex("".join(uids))
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != 16 * len(uids):
        bad = next((u for u in uids if not isinstance(u, str) or len(u) != 32), uids[0] if uids else None)
        raise ValueError(f"keep list {shown}: uid {bad!r} is not 32 hex digits")
    return np.frombuffer(raw, dtype=UID)


def combine(operation: str, lists: list[Multiset]) -> Multiset:
    """``union``, ``intersect`` or ``subtract`` of the lists, in order."""
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")
    values, counts = lists[0]
    for other, other_counts in lists[1:]:
        if operation == "union":
            merged = np.union1d(values, other)
            best = np.zeros(len(merged), dtype=np.int64)
            for v, c in ((values, counts), (other, other_counts)):
                where = np.searchsorted(merged, v)
                best[where] = np.maximum(best[where], c)
            values, counts = merged, best
        elif operation == "intersect":
            values, mine, theirs = np.intersect1d(values, other, assume_unique=True, return_indices=True)
            counts = np.minimum(counts[mine], other_counts[theirs])
        else:
            keep = ~np.isin(values, other, assume_unique=True)
            values, counts = values[keep], counts[keep]
    return values, counts


def hex_uids(values: np.ndarray) -> pa.Array:
    """``V16`` values as 32-hex uid strings (vectorised: a nibble lookup, no Python loop per uid)."""
    raw = np.frombuffer(values.tobytes(), dtype=np.uint8).reshape(-1, 16)
    chars = np.stack([HEX[raw >> 4], HEX[raw & 15]], axis=2).reshape(-1, 32)
    return pa.array(chars.view("S32").ravel(), type=pa.binary(32)).cast(pa.string())


def write_keep_list(output: Location, values: np.ndarray, counts: np.ndarray, fmt: str = "parquet") -> int:
    """The parquet keep list (each uid ``count`` times, sorted), and DataComp's ``.npy`` beside it with
    ``fmt="datacomp"``; returns the rows written."""
    repeated = np.repeat(values, counts)
    with outputs.staged(output) as tmp, pq.ParquetWriter(tmp, KEEP_SCHEMA) as writer:
        for start in range(0, len(repeated), BATCH):
            writer.write_table(
                pa.table({"uid": hex_uids(repeated[start : start + BATCH])}, schema=KEEP_SCHEMA)
            )
        if not len(repeated):
            writer.write_table(KEEP_SCHEMA.empty_table())
    if fmt == "datacomp":
        halves = np.frombuffer(repeated.tobytes(), dtype=">u8").reshape(-1, 2)
        pairs = np.empty(len(halves), dtype=np.dtype("u8,u8"))
        pairs["f0"], pairs["f1"] = halves[:, 0], halves[:, 1]
        outputs.save_npy(outputs.beside(output, ".npy"), pairs)
    return len(repeated)
