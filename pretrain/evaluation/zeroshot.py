"""Zero-shot classification (clip_benchmark's `zeroshot_classification`): class prompts become a linear
classifier over image embeddings; top-1, top-5 and mean per-class recall.

The classifier is open_clip's `build_zero_shot_classifier` (prompt embeddings normalised, averaged over the
templates, normalised again); prompts are clip_benchmark's `template.format(c=classname)`. Each rank
classifies its share of the images and the per-class counts are summed over ranks.
"""

from __future__ import annotations

import functools

import torch
from open_clip import build_zero_shot_classifier

from pretrain.evaluation.batches import all_sum, eval_batches
from webshards.evalset import EvalSet, fill_template


@torch.no_grad()
def run_classification(
    model, bundle, eval_set: EvalSet, device: torch.device, batch_size: int, split: bool, workers: int,
    name: str | None = None,
) -> dict:  # fmt: skip
    """`top1`, `top5` (top-k of min(5, classes)), `mean_per_class_recall` (sklearn's balanced accuracy, as
    clip_benchmark reports it: the mean top-1 recall over classes that have images) and `samples`. `name`:
    the eval's, for its progress (`eval_batches`)."""
    classes = len(eval_set.classnames)
    templates = [functools.partial(fill_template, t) for t in eval_set.templates]
    classifier = build_zero_shot_classifier(
        model, bundle.tokenizer, list(eval_set.classnames), templates, device=device
    )
    k = min(5, classes)
    counts = torch.zeros(
        3, classes, dtype=torch.long, device=device
    )  # per class: top-1 hits, top-k hits, images
    batches = eval_batches(eval_set.spec, bundle, device, "labels", batch_size, split, workers, name)
    for images, labels in batches:
        labels = labels.to(device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= classes):
            raise ValueError(
                f"{eval_set.root}: class index {labels.max().item()} outside its {classes} classes"
            )
        topk = (model.encode_image(images.to(device), normalize=True) @ classifier).topk(k, dim=1).indices
        hits = topk == labels[:, None]
        counts[0] += torch.bincount(labels[hits[:, 0]], minlength=classes)
        counts[1] += torch.bincount(labels[hits.any(dim=1)], minlength=classes)
        counts[2] += torch.bincount(labels, minlength=classes)
    top1, topk_hits, per_class = all_sum(counts, split).cpu()
    total = int(per_class.sum())
    if total == 0:
        raise ValueError(f"eval set {eval_set.root} holds no readable samples")
    present = per_class > 0
    recall = (top1[present].double() / per_class[present].double()).mean().item()
    return {
        "top1": int(top1.sum()) / total,
        "top5": int(topk_hits.sum()) / total,
        "mean_per_class_recall": recall,
        "samples": total,
    }
