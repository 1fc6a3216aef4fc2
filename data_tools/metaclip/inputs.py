"""Where ``metaclip`` reads (uid, caption) pairs: the shards' ``KEY.txt`` and ``KEY.json`` (the uid as
embed and filter read it), or, as a shortcut that skips reading images, an embeddings folder's metadata
parquets (``uid``, ``caption`` columns).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from data_tools.embeddings import metadata_files
from webshards import outputs
from webshards.layout import iter_shard
from webshards.urls import open_url


def iter_pairs(url: str) -> Iterator[tuple[str | None, str]]:
    """(uid, caption) of every sample of one shard or metadata parquet, in order; uid None where the sample
    has none; a missing caption reads as ""."""
    if url.endswith(".parquet"):
        table = outputs.read_parquet(url, ["uid", "caption"])
        yield from zip(table["uid"].to_pylist(), (c or "" for c in table["caption"].to_pylist()))
        return
    with open_url(url) as stream:
        for sample in iter_shard(stream, decode=False):
            caption = sample.get("txt", b"").decode("utf-8", errors="replace")
            yield _uid(sample), caption


def _uid(sample: dict) -> str | None:
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return None
    uid = meta.get("uid") if isinstance(meta, dict) else None
    return str(uid) if uid is not None else None


def metadata_inputs(embeddings: str) -> list[str]:
    """The metadata parquets of an embeddings folder, in shard order; a ValueError when there are none."""
    files = [str(f) for f in metadata_files(embeddings)]
    if not files:
        raise ValueError(f"no metadata/metadata_*.parquet in {embeddings}")
    return files


def input_versions(urls: list[str]) -> list[tuple[str, int, int | str]]:
    """Name, size and version of each input (a ``pipe:`` command: its text), so a rerun on changed inputs
    matches afresh; a ValueError names an input that is not there."""
    prints = []
    for url in urls:
        if url.startswith("pipe:"):
            prints.append((url, 0, ""))
            continue
        try:
            prints.append(outputs.fingerprint(url))
        except FileNotFoundError:
            raise ValueError(f"input not found: {url}") from None
    return prints
