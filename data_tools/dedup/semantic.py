"""SemDeDup: semantic near-duplicates, i.e. image embeddings with cosine similarity above ``1 - eps``.

Streaming, in three passes over an embeddings folder (see embed.py), never all pairs:

1. spherical k-means (faiss) on a sample of at most 256 embeddings per cluster;
2. every embedding goes to its nearest centroid's bucket, spilled to disk, so memory is one bucket;
3. per bucket, a blocked similarity matrix gives the pairs above ``1 - eps``; groups are their
   connected components.

Cluster boundaries: a near-duplicate pair can straddle two clusters. For unit vectors, cosine above
``1 - eps`` means distance below ``delta = sqrt(2 eps)``, and by the triangle inequality the partner ``y``
of an item in cluster A lies within ``d(y, own centroid) + 2 delta`` of A's centroid. So each item is also
added, as a probe, to every other cluster within that margin among its ``probes`` nearest; pairs are
searched between a cluster's members and all its members and probes. That finds every pair unless an
item had more clusters inside its margin than it could probe: the count of such items is reported as
``unchecked``, and when it is 0 the groups equal a brute-force search exactly.

The embeddings folder may be an fsspec URL (``s3://…``). The passes run as partitioned task phases
(semantic_job.py), whose spill files live under the output, on the same storage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_tools.embeddings import embedding_files, metadata_files, shard_index
from webshards import outputs
from webshards.outputs import Location

DEFAULT_EPS = 0.05
CLUSTER_SIZE = 1000  # mean cluster size when the number of clusters is not given
TRAIN_POINTS_PER_CLUSTER = 256
BLOCK_ROWS = 1024  # members per similarity block (bounds its memory: 4 KiB per bucket row)


@dataclass(frozen=True)
class SemanticConfig:
    """SemDeDup settings."""

    eps: float = DEFAULT_EPS
    """Pairs with cosine similarity above ``1 - eps`` are duplicates."""
    clusters: int | None = None
    """k-means clusters; default: one per ~1000 embeddings."""
    probes: int = 3
    """Nearest clusters each item is checked against (its own plus boundary ones)."""
    iterations: int = 20
    """k-means iterations."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"eps (--threshold) must be in (0, 1), got {self.eps}")
        if self.clusters is not None and self.clusters < 1:
            raise ValueError(f"clusters must be at least 1, got {self.clusters}")
        if self.probes < 1 or self.iterations < 1:
            raise ValueError("probes and iterations must be at least 1")


@dataclass
class SemanticResult:
    """Component labels per item plus what the keep policies and the report need."""

    labels: np.ndarray
    centroid_sim: np.ndarray
    clip_score: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def unit_rows(raw: np.ndarray) -> np.ndarray:
    """fp32 rows scaled to unit norm (stored fp16 embeddings are only unit to fp16 precision)."""
    rows = np.asarray(raw, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def embedding_parts(embeddings: Location) -> list[tuple[Location, Location]]:
    """(metadata, image embeddings) file pairs in shard order."""
    pairs = [(m, embedding_files(embeddings, shard_index(m)).image) for m in metadata_files(embeddings)]
    if not pairs:
        raise ValueError(f"no metadata/metadata_*.parquet in {embeddings}")
    return pairs


def read_part(image_file: Location) -> np.ndarray:
    """One shard's image embeddings: memory-mapped locally, downloaded from a URL."""
    return outputs.load_npy(image_file, mmap=True)


def part_rows(parts: list[tuple[Location, Location]]) -> list[int]:
    """Rows per shard; each shard's embeddings must align with its metadata rows."""
    counts = []
    for metadata, image_file in parts:
        rows = outputs.parquet_rows(metadata)
        if outputs.npy_shape(image_file)[0] != rows:
            names = f"{outputs.name(image_file)} and {outputs.name(metadata)}"
            raise ValueError(f"{names} have different row counts")
        counts.append(rows)
    return counts


def sample_rate(n: int, k: int) -> float:
    """The fraction of rows k-means trains on: at most 256 per cluster."""
    return min(1.0, k * TRAIN_POINTS_PER_CLUSTER / max(n, 1))


def kmeans_centroids(sample: np.ndarray, k: int, cfg: SemanticConfig) -> np.ndarray:
    """Unit centroids of spherical k-means (faiss) on the unit rows ``sample``."""
    import faiss

    k = max(1, min(k, len(sample)))
    kmeans = faiss.Kmeans(
        sample.shape[1], k, niter=cfg.iterations, seed=cfg.seed, spherical=True, min_points_per_centroid=1
    )
    kmeans.train(sample)
    return unit_rows(kmeans.centroids)


def nearest_clusters(centroids: np.ndarray, cfg: SemanticConfig) -> Callable[[np.ndarray], tuple[Any, ...]]:
    """A function from raw embedding rows to (similarity to the own centroid, unchecked count,
    (cluster, row, member flag) of every bucket entry: the own cluster plus the boundary probes)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    probes = min(cfg.probes, len(centroids))
    margin = 2.0 * math.sqrt(2.0 * cfg.eps)

    def search(raw: np.ndarray) -> tuple[Any, ...]:
        sims, ids = index.search(unit_rows(raw), probes)
        dist = np.sqrt(np.maximum(2.0 - 2.0 * sims, 0.0))
        near = dist <= dist[:, :1] + margin
        unchecked = int(near[:, -1].sum()) if probes < len(centroids) else 0
        rows, cols = np.nonzero(near)
        return sims[:, 0], unchecked, (ids[rows, cols], rows, cols == 0)

    return search


def bucket_edges(records: np.ndarray, eps: float) -> np.ndarray:
    """Pairs above ``1 - eps`` between a bucket's members and all its rows (members once per pair)."""
    vectors, index = unit_rows(records["vec"]), records["index"]
    member = records["member"].astype(bool)
    rows = np.flatnonzero(member)
    edges = []
    for start in range(0, len(rows), BLOCK_ROWS):
        block = rows[start : start + BLOCK_ROWS]
        r, c = np.nonzero(vectors[block] @ vectors.T > 1.0 - eps)
        a, b = index[block[r]], index[c]
        once = (a < b) | ~member[c]
        edges.append(np.stack([a[once], b[once]], axis=1))
    return np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64)


def metadata_tables(embeddings: Location) -> Iterator[Any]:
    """The key/uid/caption tables of the embeddings folder, in item order."""
    for metadata, _ in embedding_parts(embeddings):
        yield outputs.read_parquet(metadata, ["key", "uid", "caption"])
