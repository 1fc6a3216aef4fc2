"""Duplicate detection: exact (sha256), perceptual (pHash + band index) and semantic (SemDeDup).

Every method ends the same way (groups.py): connected components of the duplicate pairs, one kept item
per group by a keep policy, ``duplicates.parquet`` + ``keep.parquet`` + ``report.json`` in the output.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from data_tools.dedup.groups import choose_keep, group_ids, write_results
from data_tools.dedup.hashed_job import run_hashed
from data_tools.dedup.perceptual import DEFAULT_THRESHOLD
from data_tools.dedup.semantic import DEFAULT_EPS, SemanticConfig, SemanticResult, metadata_tables
from data_tools.dedup.semantic_job import semantic_job
from data_tools.runner import RunnerOptions
from webshards import outputs
from webshards.lineage import write_lineage
from webshards.outputs import Location

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


METHOD_PARAMS = {
    "exact": lambda cfg: {"with_caption": cfg.with_caption},
    "perceptual": lambda cfg: {"threshold_bits": cfg.bits},
    "semantic": lambda cfg: asdict(cfg.semantic()),
}
"""The settings of each method that decide its groups, as its lineage records them."""


def find_duplicates(
    output: Location,
    cfg: DedupConfig,
    options: RunnerOptions,
    shard_urls: list[str] | None = None,
    embeddings: Location | None = None,
) -> dict[str, Any] | None:
    """Find duplicates and write ``output``/duplicates.parquet, keep.parquet and report.json, every method
    as partitioned task phases (hashed_job.py, semantic_job.py); ranks other than 0 return None."""
    start = time.perf_counter()
    if cfg.method == "semantic":
        if embeddings is None:
            raise ValueError("--method semantic needs --embeddings DIR (from data-tools embed)")
        result = semantic_job(embeddings, output, cfg.semantic(), options)
        found = None if result is None else semantic_groups(result, cfg.policy, embeddings)
    else:
        if not shard_urls:
            raise ValueError(f"--method {cfg.method} needs --shards")
        found = run_hashed(output, cfg, shard_urls, options)
    if found is None:
        return None
    report = write_report(output, cfg, found, start)
    record_lineage(output, cfg, options, shard_urls, embeddings, report)
    return report


def record_lineage(
    output: Location,
    cfg: DedupConfig,
    options: RunnerOptions,
    shard_urls: list[str] | None,
    embeddings: Location | None,
    report: dict[str, Any],
) -> None:
    """The output folder's lineage: the method's settings and the report's counts (groups, removed, ...)."""
    counts = {"samples_in": report["items"], "samples_out": report["kept"]}
    counts |= {
        key: report[key] for key in ("groups", "in_groups", "removed", "exact", "unchecked") if key in report
    }
    inputs = {"embeddings": embeddings} if cfg.method == "semantic" else {"shards": shard_urls}
    made = {"keep": outputs.join(output, "keep.parquet")}
    params = {"method": cfg.method, "keep_policy": cfg.policy, **METHOD_PARAMS[cfg.method](cfg)}
    write_lineage(output, "dedup", params=params, inputs=inputs, counts=counts, outputs=made, runner=options)


def write_report(output: Location, cfg: DedupConfig, found: tuple[Any, ...], start: float) -> dict[str, Any]:
    """Keep one item per group by the policy and write the outputs of ``found`` (groups, priority, tables,
    info); returns the report, timed from ``start``."""
    groups, priority, tables, info = found
    keep = choose_keep(groups, priority)
    info = {"method": cfg.method, "keep_policy": cfg.policy, **info}
    report = write_results(output, tables, groups, keep, info)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def semantic_groups(result: SemanticResult, policy: str, embeddings: Location) -> tuple[Any, ...]:
    """Groups, the keep policy's priority, the metadata tables and the info of a SemDeDup result."""
    priority = {
        "farthest": -result.centroid_sim,
        "centroid": result.centroid_sim,
        "score": result.clip_score,
        "first": np.zeros(len(result.labels)),
    }[policy]
    return group_ids(result.labels), priority.astype(np.float64), metadata_tables(embeddings), result.info


__all__ = ["KEEP_POLICIES", "METHODS", "DedupConfig", "find_duplicates", "semantic_groups", "write_report"]
