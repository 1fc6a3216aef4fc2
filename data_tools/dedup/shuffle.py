"""The shuffle of the partitioned dedup jobs: per-shard record files split by partition, read back per partition.

A map task writes its shard's records sorted by partition (``NNNNN.records.npy``) and then, as its marker,
the partition bounds (``NNNNN.bounds.npy``: ``P + 1`` offsets). A reduce task reads its partition's slice
of every shard's file, in shard order: only that slice is read (through a memory map locally, by a ranged
read of the ``.npy`` file on an fsspec store such as ``s3://``, where the files live when the job's output
does).
"""

from __future__ import annotations

import numpy as np

from webshards import outputs
from webshards.outputs import Location


def marker_path(folder: Location, shard: int) -> Location:
    """The marker (partition bounds) of shard ``shard``'s records under ``folder``."""
    return outputs.join(folder, f"{shard:05d}.bounds.npy")


def _records_path(marker: Location) -> Location:
    return outputs.with_name(marker, outputs.name(marker).replace(".bounds.npy", ".records.npy"))


def write_partitioned(marker: Location, records: np.ndarray, partition: np.ndarray, partitions: int) -> None:
    """Write ``records`` grouped by ``partition`` (order kept inside a partition), then the bounds marker."""
    order = np.argsort(partition, kind="stable")
    bounds = np.searchsorted(partition[order], np.arange(partitions + 1)).astype(np.int64)
    outputs.save_npy(_records_path(marker), records[order])
    outputs.save_npy(marker, bounds)


def read_partition(markers: list[Location], partition: int) -> np.ndarray:
    """Partition ``partition``'s records of every shard, concatenated in shard order."""
    slices = []
    for marker in markers:
        bounds = outputs.load_npy(marker)
        start, stop = int(bounds[partition]), int(bounds[partition + 1])
        slices.append(outputs.npy_rows(_records_path(marker), start, stop))
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
