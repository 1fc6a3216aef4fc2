"""The samples a report shows (tiles) and their thumbnails, fetched from the shards by key.

A tile names its sample by key and, where known, the shard that holds it; the images are read only at the
end, one streaming pass over just the shards that hold a shown key, stopping at the last key wanted there.
A thumbnail is a small JPEG (``THUMBNAIL_SIDE`` px, quality ``JPEG_QUALITY``) as a ``data:`` URI, so the page
is one file.
"""

from __future__ import annotations

import base64
import io
import logging
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field

from PIL import Image

from webshards import outputs
from webshards.evalset import shard_urls as eval_shard_urls
from webshards.layout import iter_shard
from webshards.progress import Progress
from webshards.urls import open_url

log = logging.getLogger("data_tools")

THUMBNAIL_SIDE = 128
JPEG_QUALITY = 70
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
KEY_SHARD_DIGITS = 5
"""img2dataset keys start with the shard id (``00003`` + index): how a key is found without its shard."""


@dataclass
class Tile:
    """One sample shown: its thumbnail, caption and what happened to it."""

    key: str
    caption: str
    state: str
    """kept | removed | eval | train | sample: the tile's colour and its ``data-state``."""
    labels: list[str] = field(default_factory=list)
    """Lines under the caption, e.g. ``removed by score: 0.123 < 0.2``."""
    rules: list[str] = field(default_factory=list)
    """For a removed sample, the filter rules it fails (``data-rules``)."""
    uid: str | None = None
    source: str | None = None
    """The shard (or eval set shard) holding ``key``; None: found from the key's shard id."""
    image: str | None = None
    """The thumbnail as a ``data:`` URI, once fetched; None: not found."""
    size: tuple[int, int] = (0, 0)


def thumbnail_uri(data: bytes, side: int = THUMBNAIL_SIDE) -> tuple[str, tuple[int, int]]:
    """A JPEG ``data:`` URI of the image bytes scaled to fit ``side`` (never enlarged), and its size."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((side, side))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=JPEG_QUALITY)
        size = image.size
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii"), size


def shard_of_key(key: str, urls: list[str]) -> str | None:
    """The shard of ``urls`` whose file name is the key's shard id (``00003.tar`` for ``000030012``)."""
    stem = key[:KEY_SHARD_DIGITS]
    for url in urls:
        if posixpath.basename(url) == f"{stem}.tar":
            return url
    return None


def eval_shards(root: str) -> list[str]:
    """The tars of an eval set (clip_benchmark layout), where an eval key is looked for."""
    return list(eval_shard_urls(root))


def fetch_thumbnails(tiles: list[Tile], urls: list[str], side: int = THUMBNAIL_SIDE) -> int:
    """Fill ``image`` of every tile whose sample is found; returns how many were found.

    A tile's shard is its ``source``, else the shard named by its key. A ``source`` that is an eval set root
    (``eval:ROOT``) is searched tar by tar; ``file:PATH`` is an image file. Each shard is streamed once, until its last wanted key.
    """
    wanted: dict[str, dict[str, list[Tile]]] = defaultdict(lambda: defaultdict(list))
    for tile in tiles:
        source = tile.source or shard_of_key(tile.key, urls)
        if source is not None:
            wanted[source][tile.key].append(tile)
    found = 0
    with Progress("report (thumbnails)", len(wanted), "shards", "images") as progress:
        for source, by_key in wanted.items():
            if source.startswith("file:"):  # an image of a plain eval folder: the file itself
                hits = {key: outputs.read_bytes(source.removeprefix("file:")) for key in by_key}
            else:
                hits = _read_images(_shards(source), set(by_key))
            for key, data in hits.items():
                for tile in by_key[key]:
                    tile.image, tile.size = thumbnail_uri(data, side)
            found += sum(len(by_key[k]) for k in hits)
            progress.update(1, len(hits))
    return found


def _shards(source: str) -> list[str]:
    """The shards a tile source names: an eval set's tars (``eval:ROOT``) or one shard."""
    return eval_shards(source.removeprefix("eval:")) if source.startswith("eval:") else [source]


def _read_images(shards: list[str], keys: set[str]) -> dict[str, bytes]:
    """The image bytes of ``keys`` from ``shards``, reading each only as far as needed."""
    hits: dict[str, bytes] = {}
    for url in shards:
        with open_url(url) as stream:
            for sample in iter_shard(stream, decode=False):
                if sample["__key__"] in keys:
                    image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
                    if image is not None:
                        hits[sample["__key__"]] = image
                if len(hits) == len(keys):
                    return hits
    if len(hits) < len(keys):
        log.warning("report: %d sample(s) not found in %s", len(keys) - len(hits), shards[0])
    return hits
