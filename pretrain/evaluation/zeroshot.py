"""Zero-shot classification: class prompts become a linear classifier over image embeddings.

The eval folder is what `data-tools demo-data` writes: `classnames.txt`, `templates.txt` (one prompt per
line with `{}` for the class name) and labelled shards in `eval/` (each sample's json has `label`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import torch
from open_clip import build_zero_shot_classifier
from PIL import Image

from data_tools.shards import iter_shard, list_shards


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"zero-shot eval needs {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def labelled_images(folder: Path) -> Iterator[tuple[Image.Image, int]]:
    """(image, label) pairs from the labelled shards of an eval folder, in order."""
    shard_dir = folder / "eval" if (folder / "eval").is_dir() else folder
    shards = list_shards(shard_dir)
    if not shards:
        raise FileNotFoundError(f"no complete shards in {shard_dir}")
    for shard in shards:
        for sample in iter_shard(shard):
            yield Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), int(sample["json"]["label"])


def _batches(pairs: Iterator[tuple[Image.Image, int]], preprocess, size: int):
    images, labels = [], []
    for image, label in pairs:
        images.append(preprocess(image))
        labels.append(label)
        if len(images) == size:
            yield torch.stack(images), torch.tensor(labels)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels)


@torch.no_grad()
def run_zeroshot(model, bundle, folder: str | Path, device: torch.device, batch_size: int = 256) -> dict:
    """Top-1 / top-5 accuracy of `model` on the labelled eval shards in `folder`."""
    folder = Path(folder)
    classnames, templates = read_lines(folder / "classnames.txt"), read_lines(folder / "templates.txt")
    was_training = model.training
    model.eval()
    classifier = build_zero_shot_classifier(model, bundle.tokenizer, classnames, templates, device=device)
    correct1 = correct5 = total = 0
    k = min(5, len(classnames))
    for images, labels in _batches(labelled_images(folder), bundle.preprocess_val, batch_size):
        features = model.encode_image(images.to(device), normalize=True)
        topk = (features @ classifier).topk(k, dim=1).indices.cpu()
        hits = topk == labels[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
        total += len(labels)
    model.train(was_training)
    return {"top1": correct1 / total, "top5": correct5 / total, "samples": total}
