"""Caption evaluation: how often a captioning model's generated caption names an image's class.

For labelled eval sets whose class names are short phrases (the demo's "<colour> <shape>"): a caption counts
as right when it contains every word of its image's class name as a whole word ("a photo of a red circle"
names "red circle"; "a red circles" or "a blue circle" do not). Captions come from `pretrain.generate.search` with
the given decoding (by default open_clip `generate`'s beam search), the images from the eval shards through
the model's evaluation transform, as zero-shot reads them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.evaluation.batches import eval_batches
from pretrain.generate.decoding import DecodingConfig
from pretrain.generate.search import caption_text, generate, special_tokens
from webshards.evalset import read_eval_set
from webshards.progress import Progress

log = logging.getLogger("pretrain")


@dataclass(frozen=True)
class CaptionResult:
    score: float
    """Share of the images whose caption names every word of their class name."""
    samples: int
    examples: list[tuple[str, str]]
    """(class name, generated caption) of the first few images, in shard order."""


def names_class(caption: str, classname: str) -> bool:
    """Whether every word of `classname` is a whole word of `caption` (case-insensitive)."""
    words = set(re.findall(r"[a-z0-9]+", caption.lower()))
    return all(word in words for word in classname.lower().split())


def caption_score(captions: list[str], labels: list[int], classnames: list[str]) -> float:
    """Share of `captions` that name the class `labels[i]` of their image."""
    if not captions or len(captions) != len(labels):
        raise ValueError(f"caption score needs one label per caption, got {len(captions)} and {len(labels)}")
    return sum(names_class(c, classnames[y]) for c, y in zip(captions, labels, strict=True)) / len(captions)


@torch.no_grad()
def run_caption_eval(
    model,
    bundle,
    root: str | Path,
    device: torch.device,
    batch_size: int = 64,
    decoding: DecodingConfig | None = None,
    examples: int = 3,
    total: int | None = None,
) -> CaptionResult:
    """Caption every labelled image of the classification eval set at `root` (in batches) and score the
    captions; `decoding` None is open_clip `generate`'s default (beam search). `total`: the set's images when
    known, for the progress's ETA."""
    eval_set = read_eval_set(str(root), "zeroshot_classification")
    tokens = special_tokens(model, bundle.tokenizer)
    was_training = model.training
    model.eval()
    captions, labels = [], []
    batches = eval_batches(eval_set.spec, bundle, device, "labels", batch_size, split=False)
    with Progress("captions", total, "img", logger=log) as progress, progress.ticking():
        for images, batch_labels in batches:
            ids = generate(model, images.to(device), decoding or DecodingConfig(), tokens)
            captions += [caption_text(row, bundle.tokenizer, tokens) for row in ids]
            labels += batch_labels.tolist()
            progress.update(len(ids))
    model.train(was_training)
    classnames = list(eval_set.classnames)
    shown = [(classnames[y], c) for c, y in zip(captions[:examples], labels[:examples], strict=True)]
    return CaptionResult(caption_score(captions, labels, classnames), len(captions), shown)
