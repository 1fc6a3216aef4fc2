"""The shuffle of the partitioned dedup jobs: per-shard record files split by partition, read back per partition.

A map task writes its shard's records sorted by partition (``NNNNN.records.npy``) and then, as its marker,
the partition bounds (``NNNNN.bounds.npy``: ``P + 1`` offsets). A reduce task reads its partition's slice
of every shard's file (memory-mapped, so only that slice is read), in shard order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from webshards.atomic import atomic_path


def marker_path(folder: Path, shard: int) -> Path:
    """The marker (partition bounds) of shard ``shard``'s records under ``folder``."""
    return folder / f"{shard:05d}.bounds.npy"


def _records_path(marker: Path) -> Path:
    return marker.with_name(marker.name.replace(".bounds.npy", ".records.npy"))


def save_array(path: Path, array: np.ndarray) -> None:
    """``np.save`` to a temp name, renamed when complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def write_partitioned(marker: Path, records: np.ndarray, partition: np.ndarray, partitions: int) -> None:
    """Write ``records`` grouped by ``partition`` (order kept inside a partition), then the bounds marker."""
    order = np.argsort(partition, kind="stable")
    bounds = np.searchsorted(partition[order], np.arange(partitions + 1)).astype(np.int64)
    save_array(_records_path(marker), records[order])
    save_array(marker, bounds)


def read_partition(markers: list[Path], partition: int) -> np.ndarray:
    """Partition ``partition``'s records of every shard, concatenated in shard order."""
    slices = []
    for marker in markers:
        bounds = np.load(marker)
        records = np.load(_records_path(marker), mmap_mode="r")
        slices.append(np.array(records[bounds[partition] : bounds[partition + 1]]))
    return np.concatenate(slices)


def mix64(keys: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads structured keys (band ids, small values) evenly over partitions."""
    z = np.asarray(keys, dtype=np.uint64).copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z
