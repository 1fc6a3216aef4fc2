"""The rows ``filter`` reads straight from a shard when it has no embeddings folder (see filter.py).

Caption, language, vocabulary and size rules need no CLIP scores: a shard's KEY.txt and KEY.json members
carry all they read, so no image is decoded and no model runs. Each row is what embed would write to its
metadata parquet (key, uid, caption, sizes; embeddings.py), less the score, so the rules read both alike.
Every sample of the shard is a row, one without a caption too (its caption is empty and fails the caption
rules); the uid is the one in KEY.json, as embed takes it.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from data_tools.embeddings import METADATA_SCHEMA
from webshards.layout import iter_shard
from webshards.urls import open_url

SHARD_ROWS_SCHEMA = pa.schema([field for field in METADATA_SCHEMA if field.name != "clip_score"])
_SIZE_FIELDS = ("width", "height", "original_width", "original_height")


def shard_table(url: str) -> pa.Table:
    """The rows of every sample of the shard at ``url``, in shard order; a ValueError names a sample
    without a uid (a keep list is a list of uids)."""
    rows = []
    with open_url(url) as stream:
        for sample in iter_shard(stream, decode=False):
            rows.append(_row(sample, url))
    return pa.Table.from_pylist(rows, schema=SHARD_ROWS_SCHEMA)


def _row(sample: dict[str, Any], url: str) -> dict[str, Any]:
    """One sample's row: key and uid from its json, the caption from its txt, the sizes its json gives."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        meta = {}
    uid = meta.get("uid")
    if not uid:
        raise ValueError(f"{url}: sample {sample['__key__']} has no uid in its json")
    caption = sample.get("txt", b"").decode("utf-8", errors="replace")
    sizes = {name: meta.get(name) for name in _SIZE_FIELDS}
    return {"key": meta.get("key", sample["__key__"]), "uid": uid, "caption": caption, **sizes}
