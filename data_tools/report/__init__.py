"""``data-tools report``: one static, self-contained HTML page to look at a curation run.

What each stage kept and removed, shown by sample: counts per stage, kept and removed thumbnails per filter
rule (decisions recomputed with the filter's own code, sampling.py), a row per CLIP-score decile, duplicate
groups, decontamination pairs, language and MetaCLIP entry distributions. It reads the stages' outputs and
streams only the shards that hold a shown sample; the page is bounded by ``per_group`` thumbnails per row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from data_tools.embeddings import metadata_files
from data_tools.report import sections
from data_tools.report.page import Section, render
from data_tools.report.tiles import THUMBNAIL_SIDE, fetch_thumbnails
from webshards import outputs
from webshards.outputs import Location
from webshards.spec import expand_urls

PAGE = "index.html"


@dataclass(frozen=True)
class ReportConfig:
    """What to report on; every input but the shards is optional and adds its sections."""

    shards: str
    """The shard spec the run started from (where the thumbnails come from)."""
    embeddings: Location | None = None
    """The embeddings folder: the filter decisions and the CLIP-score deciles need it."""
    filters: tuple[Location, ...] = ()
    """Filter keep lists (``STEM_summary.json`` beside each)."""
    dedups: tuple[Location, ...] = ()
    """Dedup output folders (``report.json``)."""
    decontaminations: tuple[Location, ...] = ()
    """Decontaminate output folders (``report.json`` with example pairs)."""
    metaclips: tuple[Location, ...] = ()
    """MetaCLIP keep lists (``STEM_entry_counts.json`` beside each)."""
    reshards: tuple[Location, ...] = ()
    """Reshard output folders (``reshard.json``, ``sizes.json``)."""
    per_group: int = 8
    """Thumbnails per row (per filter decision, decile, duplicate group, eval set)."""
    seed: int = 0
    """Which samples are drawn: the same seed and inputs give the same page."""
    thumbnail_side: int = THUMBNAIL_SIDE

    def __post_init__(self) -> None:
        if self.per_group < 1:
            raise ValueError(f"per_group must be at least 1, got {self.per_group}")
        if self.thumbnail_side < 16:
            raise ValueError(f"thumbnail_side must be at least 16, got {self.thumbnail_side}")


def build_sections(cfg: ReportConfig, urls: list[str]) -> list[Section]:
    """Every section the inputs allow, in page order, with their tiles chosen (no images yet)."""
    rng = np.random.default_rng(cfg.seed)
    files = metadata_files(cfg.embeddings) if cfg.embeddings is not None else []
    if cfg.embeddings is not None and not files:
        raise ValueError(f"no metadata/metadata_*.parquet in {cfg.embeddings}")
    found = [sections.counts_section(cfg, urls, files)]
    found += [sections.filter_section(i, k, files, urls, cfg, rng) for i, k in enumerate(cfg.filters)]
    found.append(sections.deciles_section(files, urls, cfg.per_group, rng) if files else None)
    found += [sections.dedup_section(i, d, cfg.per_group) for i, d in enumerate(cfg.dedups)]
    found += [sections.decontam_section(i, d, cfg.per_group) for i, d in enumerate(cfg.decontaminations)]
    found += [sections.metaclip_section(i, k) for i, k in enumerate(cfg.metaclips)]
    return [s for s in found if s is not None]


def write_report(cfg: ReportConfig, output: Location) -> dict[str, Any]:
    """Write ``output``/index.html; returns what it holds (sections, thumbnails, missing, bytes, path)."""
    start = time.perf_counter()
    urls = expand_urls(cfg.shards)
    if not urls:
        raise ValueError(f"--shards {cfg.shards!r} names no shards")
    built = build_sections(cfg, urls)
    tiles = [t for s in built for t in s.tiles()]
    fetch_thumbnails(tiles, urls, cfg.thumbnail_side)
    footer = f"data-tools report, seed {cfg.seed}, {cfg.per_group} samples per row, shards {cfg.shards}"
    html, images = render("Curation report", built, footer)
    path = outputs.join(output, PAGE)
    outputs.make_folder(output)
    outputs.write_bytes(path, html.encode("utf-8"))
    return {
        "path": str(path),
        "sections": [s.id for s in built],
        "images": images,
        "missing": len(tiles) - images,
        "bytes": len(html.encode("utf-8")),
        "seconds": round(time.perf_counter() - start, 2),
    }
