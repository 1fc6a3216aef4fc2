"""Shard specs: brace-expanded URLs, several sources joined with `::`."""

from __future__ import annotations

from braceexpand import braceexpand


def expand_sources(spec: str) -> list[list[str]]:
    """One list of shard URLs per `::`-joined source, braces expanded, order kept."""
    sources = [s.strip() for s in spec.split("::") if s.strip()]
    if not sources:
        raise ValueError(f"empty shard spec {spec!r}")
    return [list(braceexpand(s)) for s in sources]


def expand_urls(spec: str) -> list[str]:
    """All shard URLs of a spec, sources concatenated."""
    return [url for source in expand_sources(spec) for url in source]
