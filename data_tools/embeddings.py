"""The embeddings folder layout (clip-retrieval's): the one place that knows its paths and columns.

::

    img_emb/img_emb_{i}.npy          float16, L2-normalised, one row per embedded sample of shard i
    text_emb/text_emb_{i}.npy        float16, L2-normalised, rows aligned with the images
    metadata/metadata_{i}.parquet    key, uid, caption, clip_score (+ image sizes), rows aligned
    model.json                       the model that embedded them (``--model``, ``--pretrained``)

``i`` is the input shard's position in the expanded shard spec; the metadata parquet is written last, so
its presence marks shard ``i`` complete. The folder may be an fsspec URL (``s3://bucket/emb``): paths are
then joined as text (``pathlib`` would fold ``s3://`` into ``s3:/``) and listed with fsspec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from webshards import outputs
from webshards.outputs import Location

METADATA_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("uid", pa.string()),
        ("caption", pa.string()),
        ("clip_score", pa.float32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
    ]
)


MODEL_FILE = "model.json"


@dataclass(frozen=True)
class EmbeddingFiles:
    """The three files of input shard ``i``: ``Path``s in a local folder, URLs in an fsspec one."""

    image: Location
    text: Location
    metadata: Location


def embedding_files(folder: Location, index: int) -> EmbeddingFiles:
    """The paths of shard ``index`` under ``folder`` (a local folder or an fsspec URL such as ``s3://…``)."""
    return EmbeddingFiles(
        outputs.join(folder, f"img_emb/img_emb_{index}.npy"),
        outputs.join(folder, f"text_emb/text_emb_{index}.npy"),
        outputs.join(folder, f"metadata/metadata_{index}.parquet"),
    )


def shard_index(metadata: Location) -> int:
    """The shard index ``i`` of ``metadata_{i}.parquet``."""
    return int(outputs.name(metadata).removesuffix(".parquet").removeprefix("metadata_"))


def metadata_files(folder: Location) -> list[Location]:
    """The complete shards' metadata parquets of an embeddings folder (local or a URL), in shard order."""
    found = outputs.list_files(folder, "metadata/metadata_*.parquet")
    stems = ((p, outputs.name(p).removesuffix(".parquet").removeprefix("metadata_")) for p in found)
    return sorted((p for p, stem in stems if stem.isdigit()), key=shard_index)


def model_record(model: str, pretrained: str | None) -> dict[str, Any]:
    """What ``model.json`` holds: the model as ``embed`` loads it, a local path made absolute (so a later
    job started elsewhere finds the same files)."""

    def absolute(text: str | None) -> str | None:
        return str(Path(text).resolve()) if text is not None and Path(text).exists() else text

    return {"model": absolute(model), "pretrained": absolute(pretrained)}


def record_model(folder: Location, record: dict[str, Any]) -> None:
    """Write ``model.json``; a folder that already holds embeddings of another model is a ValueError (its
    rows would mix two embedding spaces)."""
    found = read_model(folder)
    if found is not None and found != record:
        raise ValueError(f"{outputs.join(folder, MODEL_FILE)}: embedded with {found}, not {record}")
    if found is None:
        outputs.write_json(outputs.join(folder, MODEL_FILE), record)


def read_model(folder: Location) -> dict[str, Any] | None:
    """The model record of an embeddings folder, or None when it has none (made before embed wrote one)."""
    path = outputs.join(folder, MODEL_FILE)
    return json.loads(outputs.read_bytes(path)) if outputs.exists(path) else None
