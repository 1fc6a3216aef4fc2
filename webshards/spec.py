"""Shard specs: brace-expanded URLs, several sources joined with `::`, optional weights, sample counts.

A URL is a local path, `s3://...` (s3fs; endpoint from `AWS_ENDPOINT_URL`), `http(s)://...`, or
`pipe:COMMAND` (the command's stdout is the tar). Sample counts come from `sizes.json` or the
`*_stats.json` files next to the shards.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass

from braceexpand import braceexpand

from webshards.layout import SIZES_FILE, stats_name
from webshards.urls import check_readable, local_path, open_url


@dataclass(frozen=True)
class Source:
    """One `::`-separated part of a spec."""

    spec: str
    urls: tuple[str, ...]
    weight: float = 1.0
    samples: int | None = None
    """Total samples when known (from sizes.json / _stats.json), else None."""


def expand_sources(spec: str) -> list[list[str]]:
    """One list of shard URLs per `::`-joined source, braces expanded, order kept; a local folder stands for
    its `.tar` files in name order (img2dataset's 00000.tar, 00001.tar, ...)."""
    sources = [s.strip() for s in spec.split("::") if s.strip()]
    if not sources:
        raise ValueError(f"empty shard spec {spec!r}")
    return [_folder_shards(s) or list(braceexpand(s)) for s in sources]


def _folder_shards(source: str) -> list[str]:
    """The `.tar` files of a local folder named as a source ([] for anything else)."""
    path = local_path(source)
    if path is None or not os.path.isdir(path):
        return []
    tars = sorted(name for name in os.listdir(path) if name.endswith(".tar"))
    if not tars:
        raise ValueError(f"{source} is a folder without .tar shards")
    return [posixpath.join(source, name) for name in tars]


def expand_urls(spec: str) -> list[str]:
    """All shard URLs of a spec, sources concatenated."""
    return [url for source in expand_sources(spec) for url in source]


def _shard_dir_and_name(url: str) -> tuple[str, str]:
    if url.startswith("pipe:"):
        return "", ""
    return posixpath.dirname(url), posixpath.basename(url)


def _read_json(url: str) -> dict | None:
    try:
        with open_url(url, retries=0) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def shard_sample_counts(urls: list[str]) -> list[int | None]:
    """Samples per shard from its folder's `sizes.json` (one read per folder), else its `_stats.json`; None
    where neither says (and for `pipe:` sources)."""
    counts, sizes_by_dir = [], {}
    for url in urls:
        folder, name = _shard_dir_and_name(url)
        if not name:
            counts.append(None)
            continue
        if folder not in sizes_by_dir:
            sizes_by_dir[folder] = _read_json(posixpath.join(folder, SIZES_FILE)) or {}
        n = sizes_by_dir[folder].get(name)
        if n is None:
            stats = _read_json(posixpath.join(folder, stats_name(name))) or {}
            n = stats.get("successes", stats.get("count"))
        counts.append(None if n is None else int(n))
    return counts


def count_samples(urls: list[str]) -> int | None:
    """Samples in these shards (see ``shard_sample_counts``); None when any shard's count is unknown."""
    counts = shard_sample_counts(urls)
    return None if None in counts else sum(counts)


def parse_spec(spec: str, weights: list[float] | None = None, need_counts: bool = False) -> list[Source]:
    """The sources of a spec with weights and counts; a missing or empty source is a clear error."""
    parts = [s.strip() for s in spec.split("::") if s.strip()]
    expanded = expand_sources(spec)
    if weights is not None and len(weights) != len(parts):
        raise ValueError(f"data.train_weights has {len(weights)} values for {len(parts)} sources in {spec!r}")
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise ValueError(f"data.train_weights must be >= 0 with a positive sum, got {weights}")
    sources = []
    for i, (part, urls) in enumerate(zip(parts, expanded)):
        missing = [u for u in urls if local_path(u) is not None and not os.path.isfile(local_path(u))]
        if missing:
            raise FileNotFoundError(
                f"shard not found: {missing[0]} ({len(missing)} of {len(urls)} in source {part!r}; a source is "
                "a folder of .tar shards, a file, or a brace pattern such as DIR/{00000..00015}.tar)"
            )
        check_readable(urls[0])
        samples = count_samples(urls)
        if samples == 0 or (samples is None and need_counts):
            why = (
                "holds no samples" if samples == 0 else "has no sizes.json or *_stats.json next to its shards"
            )
            raise ValueError(f"source {part!r} {why}")
        sources.append(Source(part, tuple(urls), 1.0 if weights is None else float(weights[i]), samples))
    return sources
