"""`pretrain caption`: captions for image files or shards from a CoCa checkpoint, one JSON line per image.

Decoding is `pretrain.generate.search` (open_clip `generate`'s, natively). Images go through the model's evaluation
transform, as open_clip's `preprocess` does for `generate`. The output file appears only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image

from pretrain.generate.decoding import DecodingConfig
from pretrain.generate.search import caption_text, check_captioner, generate, special_tokens
from webshards.atomic import atomic_path
from webshards.layout import iter_shard
from webshards.progress import Progress
from webshards.samples import BadSample
from webshards.spec import expand_urls
from webshards.urls import open_url

log = logging.getLogger("pretrain")


def _image_files(paths: list[str]) -> Iterator[tuple[dict, Image.Image]]:
    for path in paths:
        try:
            with Image.open(path) as image:
                yield {"path": path}, image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from None


def _shard_images(
    urls: list[str], min_size: int, skipped: dict[str, int], progress: Progress
) -> Iterator[tuple[dict, Image.Image]]:
    """Samples of the shards in order; one with a bad image is counted in `skipped` and left out. A shard
    counts as done in `progress` once read (its last batch is captioned next)."""
    from pretrain.data.decode import open_image

    for url in urls:
        with open_url(url) as stream:
            for raw in iter_shard(stream, decode=False, skipped=skipped):
                try:
                    yield {"key": raw["__key__"]}, open_image(raw, min_size)
                except BadSample as e:
                    skipped[e.reason] = skipped.get(e.reason, 0) + 1
                    log.warning("%s: sample %s skipped (%s)", url, raw["__key__"], e.reason)
        progress.update(1)


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_captions(
    checkpoint: str,
    output: str | None,
    config: DecodingConfig,
    images: list[str] | None,
    shards: str | None,
    batch_size: int,
    device: str,
    seed: int,
) -> int:
    """Caption every image; returns how many lines were written (to `output`, or stdout when None)."""
    from pretrain.models.build import image_size, load_trained

    missing = [path for path in images or [] if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"image not found: {missing[0]}" + (f" (and {len(missing) - 1} more)" if missing[1:] else "")
        )
    bundle = load_trained(checkpoint, torch.device(device))
    model = bundle.model.eval()
    check_captioner(model, config)
    tokens = special_tokens(model, bundle.tokenizer)
    torch.manual_seed(seed)  # sampling draws from torch's generator, as `generate` does
    skipped: dict[str, int] = {}
    if images:  # progress in images; of shards, in shards (their sizes unknown) with the images counted
        progress = Progress("caption", len(images), "img", logger=log)
        items = _image_files(images)
    else:
        urls = expand_urls(shards)
        progress = Progress("caption", len(urls), "shards", "img", logger=log)
        items = _shard_images(urls, image_size(model), skipped, progress)
    count = 0
    with _open_output(output) as out, progress, progress.ticking():
        for batch in _batches(items, batch_size):
            pixels = torch.stack([bundle.preprocess_val(image) for _, image in batch]).to(device)
            for (name, _), ids in zip(batch, generate(model, pixels, config, tokens), strict=True):
                out.write(json.dumps({**name, "caption": caption_text(ids, bundle.tokenizer, tokens)}) + "\n")
                count += 1
            if images:
                progress.update(len(batch))
            else:  # its shard counted once read
                progress.update(0, samples=len(batch))
    if skipped:
        log.warning("skipped %s", ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())))
    return count


@contextlib.contextmanager
def _open_output(output: str | None) -> Iterator[TextIO]:
    """stdout, or a file written under a temporary name and moved into place when complete."""
    if output is None:
        yield sys.stdout
        return
    with atomic_path(output) as tmp, open(tmp, "w") as file:
        yield file
