"""The embeddings folder layout (clip-retrieval's): the one place that knows its paths and columns.

::

    img_emb/img_emb_{i}.npy          float16, L2-normalised, one row per embedded sample of shard i
    text_emb/text_emb_{i}.npy        float16, L2-normalised, rows aligned with the images
    metadata/metadata_{i}.parquet    key, uid, caption, clip_score (+ image sizes), rows aligned

``i`` is the input shard's position in the expanded shard spec; the metadata parquet is written last, so
its presence marks shard ``i`` complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

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


@dataclass(frozen=True)
class EmbeddingFiles:
    """The three files of input shard ``i``."""

    image: Path
    text: Path
    metadata: Path


def embedding_files(folder: str | Path, index: int) -> EmbeddingFiles:
    """The paths of shard ``index`` under ``folder``."""
    out = Path(folder)
    return EmbeddingFiles(
        out / "img_emb" / f"img_emb_{index}.npy",
        out / "text_emb" / f"text_emb_{index}.npy",
        out / "metadata" / f"metadata_{index}.parquet",
    )


def shard_index(metadata: Path) -> int:
    """The shard index ``i`` of ``metadata_{i}.parquet``."""
    return int(metadata.stem.removeprefix("metadata_"))


def metadata_files(folder: str | Path) -> list[Path]:
    """The complete shards' metadata parquets of an embeddings folder, in shard order."""
    found = (Path(folder) / "metadata").glob("metadata_*.parquet")
    return sorted((p for p in found if p.stem.removeprefix("metadata_").isdigit()), key=shard_index)
