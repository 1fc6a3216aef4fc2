"""The embeddings folder layout (clip-retrieval's): the one place that knows its paths and columns.

::

    img_emb/img_emb_{i}.npy          float16, L2-normalised, one row per embedded sample of shard i
    text_emb/text_emb_{i}.npy        float16, L2-normalised, rows aligned with the images
    metadata/metadata_{i}.parquet    key, uid, caption, clip_score (+ image sizes), rows aligned
    embed.json                       the model that made them: {"model", "pretrained"}

``i`` is the input shard's position in the expanded shard spec; the metadata parquet is written last, so
its presence marks shard ``i`` complete. The folder may be an fsspec URL (``s3://bucket/emb``): paths are
then joined as text (``pathlib`` would fold ``s3://`` into ``s3:/``) and listed with fsspec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


MODEL_FILE = "embed.json"


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


def model_file(folder: Location) -> Location:
    """Where an embeddings folder records its model (``embed.json``)."""
    return outputs.join(folder, MODEL_FILE)


def recorded_model(folder: Location) -> dict[str, Any] | None:
    """``{"model", "pretrained"}`` of the model that embedded ``folder``, or None when it does not say
    (embeddings written before the model was recorded)."""
    path = model_file(folder)
    return json.loads(outputs.read_bytes(path)) if outputs.exists(path) else None
