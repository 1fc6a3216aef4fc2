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

The embeddings folder may be an fsspec URL (``s3://…``). ``semantic_components`` is the single-process
reference: its bucket spill stays on local disk (a temp folder when the output is a URL). The CLI always runs
the partitioned job (semantic_job.py), whose spill files live under the output, on the same storage.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.dedup.groups import connected_components
from data_tools.embeddings import embedding_files, metadata_files, shard_index
from webshards import outputs
from webshards.outputs import Location

DEFAULT_EPS = 0.05
CLUSTER_SIZE = 1000  # mean cluster size when the number of clusters is not given
TRAIN_POINTS_PER_CLUSTER = 256
SPILL_ROWS = 1 << 20  # rows buffered before they are appended to the bucket files
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


def _count_rows(parts: list[tuple[Location, Location]]) -> int:
    """Total rows; each shard's embeddings must align with its metadata rows."""
    return sum(part_rows(parts))


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


def train_centroids(
    parts: list[tuple[Location, Location]], n: int, k: int, cfg: SemanticConfig
) -> np.ndarray:
    """Unit centroids of spherical k-means on a uniform sample of at most 256 rows per cluster."""
    rng = np.random.default_rng(cfg.seed)
    rate = sample_rate(n, k)
    sample = np.concatenate(
        [unit_rows(x[rng.random(len(x)) < rate]) for x in (read_part(p) for _, p in parts)]
    )
    return kmeans_centroids(sample, k, cfg)


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


class ClusterSpill:
    """Per-cluster bucket files of (global index, member flag, fp16 vector), appended in large batches."""

    def __init__(self, folder: Path, dim: int) -> None:
        self.folder = folder
        shutil.rmtree(folder, ignore_errors=True)  # a bucket is only valid for one k-means run
        folder.mkdir(parents=True)
        self.dtype = np.dtype([("index", "<i8"), ("member", "u1"), ("vec", "<f2", (dim,))])
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._rows = 0

    def add(self, clusters: np.ndarray, index: np.ndarray, member: np.ndarray, vectors: np.ndarray) -> None:
        records = np.empty(len(index), dtype=self.dtype)
        records["index"], records["member"], records["vec"] = index, member, vectors
        self._pending.append((clusters, records))
        self._rows += len(records)
        if self._rows >= SPILL_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        clusters = np.concatenate([c for c, _ in self._pending])
        records = np.concatenate([r for _, r in self._pending])
        order = np.argsort(clusters, kind="stable")
        bounds = np.flatnonzero(np.diff(clusters[order])) + 1
        for chunk in np.split(order, bounds):
            with open(self.folder / f"{int(clusters[chunk[0]]):06d}.bin", "ab") as f:
                records[chunk].tofile(f)
        self._pending, self._rows = [], 0

    def buckets(self) -> Iterator[np.ndarray]:
        for path in sorted(self.folder.glob("*.bin")):
            yield np.fromfile(path, dtype=self.dtype)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def assign(
    parts: list[tuple[Location, Location]],
    centroids: np.ndarray,
    spill: ClusterSpill,
    n: int,
    cfg: SemanticConfig,
) -> tuple[np.ndarray, int]:
    """Spill every item to its nearest cluster and, as a probe, to boundary clusters within the margin.

    Returns each item's cosine similarity to its own centroid and the number of unchecked items.
    """
    search = nearest_clusters(centroids, cfg)
    centroid_sim, unchecked, offset = np.zeros(n, dtype=np.float32), 0, 0
    for _, image_file in parts:
        raw = np.asarray(read_part(image_file))
        own_sim, part_unchecked, (clusters, rows, member) = search(raw)
        unchecked += part_unchecked
        centroid_sim[offset : offset + len(raw)] = own_sim
        spill.add(clusters, offset + rows, member, raw[rows])
        offset += len(raw)
    spill.flush()
    return centroid_sim, unchecked


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


def semantic_components(embeddings: Location, work_dir: Location, cfg: SemanticConfig) -> SemanticResult:
    """Duplicate components over all image embeddings of ``embeddings``; buckets live under ``work_dir``
    (a local temp folder when ``work_dir`` is a URL: this one process is the only reader)."""
    parts = embedding_parts(embeddings)
    n = _count_rows(parts)
    if n == 0:
        raise ValueError(f"no embeddings in {embeddings}")
    k = cfg.clusters or max(1, math.ceil(n / CLUSTER_SIZE))
    centroids = train_centroids(parts, n, k, cfg)
    with _local_folder(work_dir) as folder:
        spill = ClusterSpill(folder / "semantic-buckets", centroids.shape[1])
        centroid_sim, unchecked = assign(parts, centroids, spill, n, cfg)
        edges = [bucket_edges(records, cfg.eps) for records in spill.buckets()]
        spill.remove()
    labels = connected_components(n, np.concatenate(edges) if edges else np.zeros((0, 2), np.int64))
    scores = [outputs.read_parquet(m, ["clip_score"])["clip_score"].to_numpy() for m, _ in parts]
    info = {"eps": cfg.eps, "clusters": len(centroids), "probes": cfg.probes, "unchecked": unchecked}
    return SemanticResult(labels, centroid_sim, np.concatenate(scores), {**info, "exact": unchecked == 0})


@contextlib.contextmanager
def _local_folder(work_dir: Location) -> Iterator[Path]:
    """``work_dir`` itself when local, else a temp folder removed afterwards."""
    if not outputs.is_remote(work_dir):
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="semantic-") as folder:
        yield Path(folder)


def metadata_tables(embeddings: Location) -> Iterator[Any]:
    """The key/uid/caption tables of the embeddings folder, in item order."""
    for metadata, _ in embedding_parts(embeddings):
        yield outputs.read_parquet(metadata, ["key", "uid", "caption"])
