"""The target images of ``filter --target`` (image_filter.py) embedded exactly as ``embed`` embeds a shard's
images: the same model bundle (``embed.load_embedder``), the same decoding (``open_image``, reduced JPEG
decoding included) and validation transform, fp32 L2-normalised rows. On CPU, in fp32, as embed on CPU."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data_tools import models
from data_tools.embed import load_embedder
from webshards.layout import iter_shard
from webshards.samples import IMAGE_EXTENSIONS, BadSample
from webshards.urls import open_url

log = logging.getLogger("data_tools")
DEVICE = "cpu"


def raw_images(source: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Raw samples (``{ext: bytes}``) of one unit of targets: an eval-set tar or a list of image files."""
    kind, *rest = source
    if kind == "tar":
        with open_url(rest[0]) as stream:
            yield from iter_shard(stream, decode=False)
        return
    for path in rest:
        ext = Path(path).suffix.lower().lstrip(".")
        # PIL reads the format from the bytes; the key only has to be an image member's
        yield {"__key__": path, ext if ext in IMAGE_EXTENSIONS else "png": Path(path).read_bytes()}


def embed_images(
    samples: Iterable[dict[str, Any]], model: str, pretrained: str | None, batch: int
) -> np.ndarray:
    """Unit image embeddings (fp32, one row per decodable image; others are logged and left out)."""
    bundle = load_embedder(model, pretrained, DEVICE)
    transform, normalize = models.split_transform(bundle.preprocess_val)
    size = models.image_size(bundle.model)
    pending: list[torch.Tensor] = []
    rows: list[np.ndarray] = []
    for raw in samples:
        try:
            pending.append(transform(models.open_image(raw, size)))
        except BadSample as error:
            log.warning("filter --target: skipping %s: %s", raw.get("__key__"), error)
        if len(pending) == batch:
            rows.append(_encode(bundle.model, pending, normalize))
            pending = []
    if pending:
        rows.append(_encode(bundle.model, pending, normalize))
    width = int(getattr(bundle.model.visual, "output_dim", 0))
    return np.concatenate(rows) if rows else np.zeros((0, width), dtype=np.float32)


@torch.no_grad()
def _encode(model: torch.nn.Module, images: list[torch.Tensor], normalize: Any) -> np.ndarray:
    batch = torch.stack(images)
    if normalize:
        batch = normalize(batch)
    return F.normalize(model.encode_image(batch).float(), dim=-1).numpy()
