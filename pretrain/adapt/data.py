"""The labelled images of an eval-set split (clip_benchmark's layout, `webshards.evalset`) and the frozen
image features methods train and evaluate on.

A split is read twice when few-shot: once for keys and labels only (cheap: no image is decoded), then for the
images of the chosen keys. Features are those of clip_benchmark's linear probe: the model's `encode_image` on
the eval transform, L2-normalised; they are computed once per (split, keys) and cached in the output folder,
so a resumed run or a second method on the same folder reuses them.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from webshards.atomic import atomic_path
from webshards.evalset import shard_urls
from webshards.layout import iter_shard
from webshards.urls import open_url

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")


@dataclass(frozen=True)
class LabelledImages:
    """Which samples of a split to use: the split's shard URLs and the chosen keys with their labels, in
    order (all samples when not few-shot)."""

    root: str
    split: str
    urls: tuple[str, ...]
    keys: tuple[str, ...]
    labels: tuple[int, ...]

    def subset(self, keep: Sequence[int]) -> LabelledImages:
        """The samples at positions `keep`, in that order."""
        return LabelledImages(
            self.root, self.split, self.urls, tuple(self.keys[i] for i in keep),
            tuple(self.labels[i] for i in keep),
        )  # fmt: skip

    def fingerprint(self) -> str:
        """A short digest of the split and keys: names this selection's feature cache."""
        text = "\n".join([self.root, self.split, *self.keys])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _samples(urls: Sequence[str]) -> Iterator[dict]:
    for url in urls:
        with open_url(url) as f:
            yield from iter_shard(f, decode=False)


def _label(sample: dict, where: str) -> int:
    try:
        return int(sample["cls"])
    except (KeyError, ValueError):
        raise ValueError(f"{where}: sample {sample['__key__']} has no class index (.cls)") from None


def read_labels(root: str, split: str) -> LabelledImages:
    """Every sample of ROOT's `split` with its class index (no image decoded)."""
    urls = shard_urls(root, split)
    keys, labels = [], []
    for sample in _samples(urls):
        keys.append(sample["__key__"])
        labels.append(_label(sample, f"{root}/{split}"))
    if not keys:
        raise ValueError(f"{root}/{split}: the split holds no samples")
    return LabelledImages(root, split, urls, tuple(keys), tuple(labels))


def _image(sample: dict) -> Image.Image:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return Image.open(io.BytesIO(sample[ext])).convert("RGB")
    raise ValueError(f"sample {sample['__key__']} has no image ({', '.join(IMAGE_EXTENSIONS)})")


def iter_images(images: LabelledImages, preprocess, batch_size: int) -> Iterator[tuple[torch.Tensor, list]]:
    """`(pixels, keys)` batches of the chosen samples, in shard order, through `preprocess`."""
    wanted = set(images.keys)
    pixels, keys = [], []
    for sample in _samples(images.urls):
        if sample["__key__"] not in wanted:
            continue
        pixels.append(preprocess(_image(sample)))
        keys.append(sample["__key__"])
        if len(keys) == batch_size:
            yield torch.stack(pixels), keys
            pixels, keys = [], []
    if keys:
        yield torch.stack(pixels), keys


def load_pixels(images: LabelledImages, preprocess) -> torch.Tensor:
    """The preprocessed images of the chosen samples in `images.keys` order (for methods that train the
    image encoder; few-shot sets are small)."""
    found: dict[str, torch.Tensor] = {}
    for pixels, keys in iter_images(images, preprocess, 64):
        found.update(zip(keys, pixels))
    return torch.stack([found[k] for k in images.keys])


@torch.no_grad()
def compute_features(model, images: LabelledImages, preprocess, device: torch.device, batch_size: int = 64):
    """L2-normalised `encode_image` features of the chosen samples, in `images.keys` order (float32, CPU)."""
    was_training = model.training
    model.eval()
    found: dict[str, torch.Tensor] = {}
    try:
        for pixels, keys in iter_images(images, preprocess, batch_size):
            features = model.encode_image(pixels.to(device), normalize=True).float().cpu()
            found.update(zip(keys, features))
    finally:
        model.train(was_training)
    missing = [k for k in images.keys if k not in found]
    if missing:
        raise ValueError(f"{images.root}/{images.split}: sample {missing[0]} has no readable image")
    return torch.stack([found[k] for k in images.keys])


def cached_features(
    model, images: LabelledImages, preprocess, device: torch.device, cache: Path | None, tag: str
) -> torch.Tensor:
    """`compute_features`, read from `cache/{tag}-{fingerprint}.pt` when there (written atomically when not).
    `tag` names the model the features come from, so two checkpoints never share a cache file."""
    path = None if cache is None else Path(cache) / f"{tag}-{images.fingerprint()}.pt"
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    features = compute_features(model, images, preprocess, device)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(features, tmp)
    return features


@dataclass
class AdaptRun:
    """What a method's `fit` gets: the model, the training shots (labels index `classnames`), the output
    folder, and cached features of any labelled images."""

    bundle: object
    """The checkpoint's `ModelBundle` (model, tokenizer, transforms)."""
    checkpoint: str
    """Where the model came from (`--checkpoint`, resolved)."""
    device: torch.device
    classnames: tuple[str, ...]
    """The classes trained on (the base classes in a base-to-novel split)."""
    templates: tuple[str, ...]
    """The train set's prompt templates (`{c}` marks the class name)."""
    train: LabelledImages
    """The K-shot training samples."""
    pool: LabelledImages
    """Every training-split sample of those classes (for validation draws outside the shots)."""
    output: Path
    seed: int
    cache: Path | None
    """Feature cache folder (None: do not write one, e.g. on ranks other than 0)."""
    tag: str
    """Names the checkpoint in cache files."""

    def features(self, images: LabelledImages) -> torch.Tensor:
        """Normalised frozen image features of `images` (cached)."""
        model, preprocess = self.bundle.model, self.bundle.preprocess_val
        return cached_features(model, images, preprocess, self.device, self.cache, self.tag)
