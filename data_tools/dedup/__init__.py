"""Duplicate detection: exact (sha256), perceptual (pHash + band index) and semantic (SemDeDup).

Every method ends the same way (groups.py): connected components of the duplicate pairs, one kept item
per group by a keep policy, ``duplicates.parquet`` + ``keep.parquet`` + ``report.json`` in the output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.dedup.exact import exact_labels
from data_tools.dedup.features import FeatureJob, iter_tables, read_features, run_features
from data_tools.dedup.groups import choose_keep, connected_components, group_ids, write_results
from data_tools.dedup.hashed_job import run_hashed
from data_tools.dedup.perceptual import DEFAULT_THRESHOLD, perceptual_edges
from data_tools.dedup.semantic import DEFAULT_EPS, SemanticConfig, metadata_tables, semantic_components
from data_tools.dedup.semantic_job import semantic_job
from data_tools.phases import JobOptions

METHODS = ("exact", "perceptual", "semantic")
KEEP_POLICIES = {
    "exact": ("first", "largest"),
    "perceptual": ("first", "largest"),
    "semantic": ("farthest", "centroid", "score", "first"),
}
"""Per method, the policies it accepts; the first is the default. first: earliest in shard order;
largest: most pixels; farthest/centroid: least/most similar to its k-means centroid (SemDeDup keeps the
farthest); score: highest clip_score."""


@dataclass(frozen=True)
class DedupConfig:
    """Which duplicates to find and which member of a group to keep."""

    method: str
    threshold: float | None = None
    """perceptual: Hamming distance in bits (default 10); semantic: eps (default 0.05); exact: unused."""
    keep_policy: str | None = None
    """One of KEEP_POLICIES[method]; default: the first listed."""
    with_caption: bool = False
    """exact: also require the same normalised caption."""
    clusters: int | None = None
    """semantic: k-means clusters (default: one per ~1000 items)."""
    probes: int = 3
    """semantic: nearest clusters each item is checked against."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.keep_policy is not None and self.keep_policy not in KEEP_POLICIES[self.method]:
            raise ValueError(f"keep policy for {self.method} must be one of {KEEP_POLICIES[self.method]}")
        if self.method == "perceptual" and not 0 <= self.bits <= 32:
            raise ValueError(f"perceptual threshold must be 0..32 bits, got {self.threshold}")

    @property
    def policy(self) -> str:
        return self.keep_policy or KEEP_POLICIES[self.method][0]

    @property
    def bits(self) -> int:
        return DEFAULT_THRESHOLD if self.threshold is None else int(self.threshold)

    def semantic(self) -> SemanticConfig:
        eps = DEFAULT_EPS if self.threshold is None else float(self.threshold)
        return SemanticConfig(eps=eps, clusters=self.clusters, probes=self.probes, seed=self.seed)


def find_duplicates(
    output: str | Path,
    cfg: DedupConfig,
    shard_urls: list[str] | None = None,
    embeddings: str | Path | None = None,
    workers: int = 1,
    job: JobOptions | None = None,
) -> dict[str, Any] | None:
    """Find duplicates and write ``output``/duplicates.parquet, keep.parquet and report.json.

    Without ``job`` in one process (the reference path); with it as partitioned task phases
    (hashed_job.py, semantic_job.py), which give the same files; then ranks other than 0 return None.
    """
    start = time.perf_counter()
    if cfg.method == "semantic":
        if embeddings is None:
            raise ValueError("--method semantic needs --embeddings DIR (from data-tools embed)")
        found = _semantic(output, cfg, embeddings, job)
    else:
        if not shard_urls:
            raise ValueError(f"--method {cfg.method} needs --shards")
        found = (
            _hashed(output, cfg, shard_urls, workers)
            if job is None
            else run_hashed(output, cfg, shard_urls, job)
        )
    if found is None:
        return None
    groups, priority, tables, info = found
    keep = choose_keep(groups, priority)
    info = {"method": cfg.method, "keep_policy": cfg.policy, **info}
    report = write_results(output, tables, groups, keep, info)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def _hashed(output: str | Path, cfg: DedupConfig, urls: list[str], workers: int) -> tuple[Any, ...]:
    """Exact or perceptual: hash per shard (resumable), then group the hashes."""
    start = time.perf_counter()
    files = run_features(urls, output, FeatureJob(cfg.method, cfg.with_caption), workers)
    hashing = time.perf_counter() - start
    features, pixels = read_features(files, cfg.method)
    if cfg.method == "exact":
        labels, info = exact_labels(features), {"with_caption": cfg.with_caption}
    else:
        labels = connected_components(len(features), perceptual_edges(features, cfg.bits))
        info = {"threshold_bits": cfg.bits}
    info["hash_seconds"] = round(hashing, 3)
    priority = pixels.astype(np.float64) if cfg.policy == "largest" else np.zeros(len(pixels))
    return group_ids(labels), priority, iter_tables(files), info


def _semantic(output: str | Path, cfg: DedupConfig, embeddings: str | Path, job: JobOptions | None) -> Any:
    if job is None:
        result = semantic_components(embeddings, output, cfg.semantic())
    else:
        result = semantic_job(embeddings, output, cfg.semantic(), job)
    if result is None:
        return None
    priority = {
        "farthest": -result.centroid_sim,
        "centroid": result.centroid_sim,
        "score": result.clip_score,
        "first": np.zeros(len(result.labels)),
    }[cfg.policy]
    return group_ids(result.labels), priority.astype(np.float64), metadata_tables(embeddings), result.info


__all__ = ["KEEP_POLICIES", "METHODS", "DedupConfig", "find_duplicates"]
