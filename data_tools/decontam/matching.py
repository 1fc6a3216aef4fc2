"""The training side of decontamination: every training image compared with the eval index, per shard.

One runner task per training shard writes the shard's pairs (training row, key, uid, eval image, score)
as ``NNNNN.parquet``, its marker. Training features are dedup's own: exact and perceptual read the
shard's hash file under ``DIR/features/METHOD/`` (dedup's ``hash_shard`` writes it first when it is not
there, so a rerun with another threshold, or a dedup into the same folder, hashes nothing again);
semantic reads the shard's rows of ``--embeddings``. The comparison never looks at all pairs:

- exact: a dict lookup of the sha256 digest;
- perceptual: a band index of the eval pHashes (``dedup.perceptual.BandIndex``), exact within the threshold;
- semantic: faiss range search (inner product of unit vectors) over the eval embeddings, all above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa

from data_tools.decontam.evalimages import EvalIndex, load_index
from data_tools.dedup.features import FEATURE_COLUMN, FeatureJob, feature_files, fixed_binary, hash_shard
from data_tools.dedup.perceptual import BandIndex, popcount
from data_tools.dedup.semantic import read_part, unit_rows
from data_tools.dedup.semantic_job import fork_safe_faiss
from data_tools.embeddings import embedding_files
from data_tools.runner import Task
from webshards import outputs
from webshards.outputs import Location

PAIRS_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("key", pa.string()),
        ("uid", pa.string()),
        ("eval", pa.int64()),
        ("score", pa.float32()),
    ]
)
"""A shard's pairs: training row in the shard, its key and uid, the eval image (index number), and the
score: 0 (exact), Hamming bits (perceptual) or cosine similarity (semantic)."""

Finder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class MatchJob:
    """What every match task compares with: the method, its threshold and the eval index parts."""

    method: str
    threshold: float
    index_files: tuple[Location, ...]
    set_ids: tuple[int, ...]
    """The eval set of each index part."""


def items_files(
    output: Location, method: str, count: int, embeddings: Location | None
) -> list[tuple[Location, Location]]:
    """(key/uid table, features) files of each of ``count`` training shards: dedup's hash file (both in
    one), or the embeddings' metadata and image embeddings."""
    if method == "semantic":
        return [(f.metadata, f.image) for f in (embedding_files(embeddings, i) for i in range(count))]
    return [(path, path) for path in feature_files(output, FeatureJob(method), count)]


def match_task(task: Task) -> int:
    """The runner task: one training shard's pairs with the eval images; returns the items compared."""
    index, url, (items, features_file), job = task.payload
    if job.method != "semantic" and not outputs.exists(items):
        hash_shard(Task(f"hash:{index}", items, (url, FeatureJob(job.method))))
    table, features = read_items(items, features_file, job.method)
    rows, evals, scores = finder(job)(features)
    columns = {"row": rows, "key": table["key"].take(rows), "uid": table["uid"].take(rows)}
    pairs = pa.table({**columns, "eval": evals, "score": scores.astype(np.float32)}, schema=PAIRS_SCHEMA)
    outputs.write_parquet(task.output, pairs)
    return table.num_rows


def read_items(items: Location, features_file: Location, method: str) -> tuple[pa.Table, np.ndarray]:
    """(key/uid table, features) of one training shard: digests ``(n, 32)``, pHashes ``(n,)`` or unit
    embedding rows ``(n, d)``."""
    if method == "semantic":
        table = outputs.read_parquet(items, ["key", "uid"])
        features = unit_rows(read_part(features_file))
        if len(features) != table.num_rows:
            raise ValueError(
                f"{outputs.name(features_file)} and {outputs.name(items)} have different row counts"
            )
        return table, features
    column = FEATURE_COLUMN[method]
    table = outputs.read_parquet(items, ["key", "uid", column])
    feature = table[column].combine_chunks()
    return table, fixed_binary(feature) if method == "exact" else feature.to_numpy()


@lru_cache(maxsize=1)
def finder(job: MatchJob) -> Finder:
    """The job's search over the eval index, built once per process: training features -> (rows, eval
    image numbers, scores) of every pair."""
    index = load_index(job.index_files, job.set_ids)
    build = {"exact": _exact, "perceptual": _perceptual, "semantic": _semantic}[job.method]
    return build(index, job.threshold)


def _exact(index: EvalIndex, threshold: float) -> Finder:
    digests: dict[bytes, list[int]] = {}
    for number, digest in enumerate(index.features):
        digests.setdefault(digest.tobytes(), []).append(number)

    def find(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pairs = [(row, e) for row, d in enumerate(features) for e in digests.get(d.tobytes(), ())]
        found = np.array(pairs, dtype=np.int64).reshape(-1, 2)
        return found[:, 0], found[:, 1], np.zeros(len(found))

    return find


def _perceptual(index: EvalIndex, threshold: float) -> Finder:
    hashes = index.features.astype(np.uint64)
    bands = BandIndex(hashes, int(threshold))

    def find(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = np.asarray(features, dtype=np.uint64)
        pairs = bands.query(values)
        rows, evals = pairs[:, 0], pairs[:, 1]
        return rows, evals, popcount(values[rows] ^ hashes[evals]).astype(np.float64)

    return find


def _semantic(index: EvalIndex, threshold: float) -> Finder:
    import faiss

    fork_safe_faiss()
    vectors = np.ascontiguousarray(index.features, dtype=np.float32)
    search = faiss.IndexFlatIP(vectors.shape[1])
    search.add(vectors)

    def find(features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if features.shape[1] != vectors.shape[1]:
            raise ValueError(
                f"training embeddings have {features.shape[1]} dims, the eval ones {vectors.shape[1]}"
            )
        lims, sims, evals = search.range_search(np.ascontiguousarray(features, dtype=np.float32), threshold)
        rows = np.repeat(np.arange(len(features)), np.diff(lims).astype(np.int64))
        above = sims > threshold  # faiss keeps sims above the radius too; said here, not assumed
        return rows[above], evals[above].astype(np.int64), sims[above].astype(np.float64)

    return find
