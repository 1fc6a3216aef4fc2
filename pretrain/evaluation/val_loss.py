"""Contrastive validation loss on held-out shards in the training format (`eval.val_data`).

The InfoNCE loss of the whole held-out set at once: every held-out pair is a negative for every other, the
mean of both directions, at the model's logit scale. Unlike open_clip's per-batch `clip_val_loss` it does
not depend on how the set is batched or split over ranks. Each rank embeds its share; the embeddings are
gathered; each rank takes the loss terms of its own rows and the sums are added over ranks.

It is logged as `val_loss_whole_set`, beside `val_loss_chance` = log N (what a model that knows nothing scores
with N - 1 negatives per pair): the training loss has log(global batch) as its chance level, so the two numbers
are not comparable, and a whole-set loss of ~7 on 1,600 pairs is not a diverged run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.evaluation.batches import all_sum, eval_batches, gather_rows, rank_offset

TASK = "contrastive_loss"


@torch.no_grad()
def run_val_loss(
    model,
    bundle,
    spec: str,
    device: torch.device,
    batch_size: int,
    split: bool,
    workers: int,
    name: str | None = None,
) -> dict:
    """`{"task": "contrastive_loss", "val_loss_whole_set", "val_loss_chance", "samples"}` over the shards of
    `spec`. `name`: the eval's, for its progress (`eval_batches`)."""
    images, texts = [], []
    for batch, tokens in eval_batches(spec, bundle, device, "tokens", batch_size, split, workers, name):
        images.append(model.encode_image(batch.to(device), normalize=True).float())
        texts.append(model.encode_text(tokens.to(device), normalize=True).float())
    local = sum(len(x) for x in images)
    dim = images[0].shape[1] if images else _width(model, bundle, device)
    image_f = torch.cat(images) if images else torch.zeros(0, dim, device=device)
    text_f = torch.cat(texts) if texts else torch.zeros(0, dim, device=device)
    first = rank_offset(local, split)
    all_images, all_texts = gather_rows(image_f, split), gather_rows(text_f, split)
    if len(all_images) == 0:
        raise ValueError(f"eval.val_data {spec!r} holds no readable samples")
    scale = model.logit_scale.exp().float()
    targets = torch.arange(first, first + local, device=device)
    total = F.cross_entropy(scale * image_f @ all_texts.T, targets, reduction="sum")
    total = total + F.cross_entropy(scale * text_f @ all_images.T, targets, reduction="sum")
    total = all_sum(total.reshape(1).double(), split)
    count = len(all_images)
    return {
        "task": TASK,
        "val_loss_whole_set": total.item() / (2 * count),
        "val_loss_chance": math.log(count),
        "samples": count,
    }


def _width(model, bundle, device: torch.device) -> int:
    """The embedding width, for a rank that got no samples."""
    return model.encode_text(bundle.tokenizer([""]).to(device), normalize=True).shape[1]
