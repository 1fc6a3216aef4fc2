"""Exact and perceptual dedup as partitioned task phases (see data_tools/phases.py): the groups are the
connected components of every pair of equal digests (exact) or of hashes within the threshold (perceptual).

1. ``hash``: one task per shard (features.py), as before;
2. ``scatter``: one task per shard sends each item's record to partitions by key (shuffle.py):
   exact: the digest, so equal digests meet in one partition;
   perceptual: ``r + 1`` exact-match bands of the 64-bit hash (the band id with its value is the key). Two
   hashes within ``r`` bits differ in at most ``r`` of the ``r + 1`` bands, so they agree on one band
   (pigeonhole) and both land in its key's partition;
3. ``edges``: one task per partition: exact groups by sorting its digests; perceptual runs the band-index
   search (``perceptual_edges``) over the partition's hashes, so every candidate is verified on all 64
   bits. Pairs found between items of different keys are true pairs too; a pair found twice is harmless;
4. merge (rank 0): connected components of all edges, then the groups and keep list as before.

Memory: a scatter task holds one shard's hashes; an edges task its partition, about ``n / P`` digests or
``(r + 1) n / P`` hashes (a single band key cannot be split, so at most ``n / 2^(64 // (r + 1))`` per key);
the merge holds O(n) int64 labels, pixels and the edges.

Scratch files live under ``DIR/partitions/`` of the output (an fsspec URL such as ``s3://…`` too, where the
nodes of a rank split see each other's files) and are removed after the merge; the per-shard hashes stay
in ``DIR/features/`` for reruns.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from data_tools.dedup.exact import DIGEST_BYTES
from data_tools.dedup.features import (
    FEATURE_COLUMN,
    FeatureJob,
    fixed_binary,
    iter_tables,
    read_features,
    run_features,
)
from data_tools.dedup.groups import connected_components, group_ids
from data_tools.dedup.perceptual import HASH_BITS, perceptual_edges
from data_tools.dedup.shuffle import marker_path, mix64, read_partition, write_partitioned
from data_tools.phases import input_fingerprint, release_scratch, run_phase, settings_key
from data_tools.runner import RunnerOptions, Task
from webshards import outputs
from webshards.outputs import Location

SCRATCH = "partitions"


def run_hashed(
    output: Location, cfg: Any, urls: list[str], options: RunnerOptions
) -> tuple[np.ndarray, np.ndarray, Any, dict[str, Any]] | None:
    """Exact or perceptual dedup of ``urls`` as task phases; (groups, priority, tables, info) on rank 0."""
    start = time.perf_counter()
    files = run_features(urls, output, FeatureJob(cfg.method, cfg.with_caption), options)
    hashing = time.perf_counter() - start
    scratch = outputs.join(output, SCRATCH)
    settings = {"method": cfg.method, "caption": cfg.with_caption, "bits": cfg.bits, "P": options.partitions}
    work = outputs.join(scratch, settings_key({**settings, "inputs": input_fingerprint(files)}))
    offsets = np.cumsum([0] + [outputs.parquet_rows(f) for f in files])
    folder = outputs.join(work, "scatter")
    payload = (cfg.method, cfg.bits, options.partitions)
    tasks = [
        Task(f"scatter:{i}", marker_path(folder, i), (f, int(offsets[i]), *payload))
        for i, f in enumerate(files)
    ]
    run_phase(tasks, scatter_task, options, f"dedup {cfg.method} (scatter)")
    markers = [task.output for task in tasks]
    edge_tasks = [
        Task(f"edges:{p}", outputs.join(work, f"edges/{p:05d}.npy"), (markers, p, cfg.method, cfg.bits))
        for p in range(options.partitions)
    ]
    run_phase(edge_tasks, edges_task, options, f"dedup {cfg.method} (edges)", last=True)
    if not options.is_merger:
        release_scratch(scratch, work, options)
        return None
    edges = np.concatenate([outputs.load_npy(task.output) for task in edge_tasks])
    labels = connected_components(int(offsets[-1]), edges)
    pixels = read_features(files, cfg.method)[1] if cfg.policy == "largest" else np.zeros(int(offsets[-1]))
    release_scratch(scratch, work, options)
    info = {"with_caption": cfg.with_caption} if cfg.method == "exact" else {"threshold_bits": cfg.bits}
    info["hash_seconds"] = round(hashing, 3)
    return group_ids(labels), pixels.astype(np.float64), iter_tables(files), info


def scatter_task(task: Task) -> int:
    """One shard's records (global index + hash), each sent to the partitions of its keys."""
    path, offset, method, bits, partitions = task.payload
    column = outputs.read_parquet(path, [FEATURE_COLUMN[method]])[FEATURE_COLUMN[method]]
    index = offset + np.arange(len(column), dtype=np.int64)
    if method == "exact":
        records, partition = _exact_records(column, index, partitions)
    else:
        records, partition = _band_records(column.to_numpy().astype(np.uint64), index, bits, partitions)
    write_partitioned(task.output, records, partition, partitions)
    return len(column)


def _exact_records(column: Any, index: np.ndarray, partitions: int) -> tuple[np.ndarray, np.ndarray]:
    dtype = np.dtype([("index", "<i8"), ("digest", "u1", (DIGEST_BYTES,))])
    records = np.empty(len(index), dtype=dtype)
    records["index"] = index
    if len(index):
        records["digest"] = fixed_binary(column.combine_chunks())
    head = records["digest"][:, :8].copy().view(">u8").ravel().astype(np.uint64)
    return records, (head % np.uint64(partitions)).astype(np.int64)


def band_widths(bits: int) -> list[int]:
    """``bits + 1`` bands over the 64 hash bits, as even as possible."""
    m = bits + 1
    return [HASH_BITS // m + (1 if i < HASH_BITS % m else 0) for i in range(m)]


def _band_records(
    hashes: np.ndarray, index: np.ndarray, bits: int, partitions: int
) -> tuple[np.ndarray, np.ndarray]:
    """One record per item and partition that any of its band keys maps to."""
    parts, shift = [], 0
    for band, width in enumerate(band_widths(bits)):
        mask = np.uint64((1 << width) - 1)
        value = (hashes >> np.uint64(shift)) & mask
        shift += width
        key = mix64(value ^ mix64(np.full(len(value), band, dtype=np.uint64)))
        parts.append((key % np.uint64(partitions)).astype(np.int64))
    rows = np.arange(len(hashes), dtype=np.int64)
    pairs = np.unique(np.concatenate([p * len(hashes) + rows for p in parts]) if parts else rows)
    partition, row = np.divmod(pairs, max(len(hashes), 1))
    records = np.empty(len(row), dtype=np.dtype([("index", "<i8"), ("hash", "<u8")]))
    records["index"], records["hash"] = index[row], hashes[row]
    return records, partition


def edges_task(task: Task) -> int:
    """The duplicate edges (global index pairs) inside one partition."""
    markers, partition, method, bits = task.payload
    records = read_partition(markers, partition)
    index = records["index"]
    if method == "exact":
        keys = np.ascontiguousarray(records["digest"]).view(np.dtype((np.void, DIGEST_BYTES))).ravel()
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        local = np.stack([np.arange(len(keys)), first[inverse.ravel()]], axis=1)
        local = local[local[:, 0] != local[:, 1]]
    else:
        local = perceptual_edges(records["hash"], bits)
    outputs.save_npy(task.output, index[local].reshape(-1, 2))
    return len(records)
