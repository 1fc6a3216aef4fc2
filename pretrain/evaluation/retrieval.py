"""Zero-shot retrieval (clip_benchmark's `zeroshot_retrieval`): recall@k in both directions over an eval
set of images with one or more captions each.

clip_benchmark's definitions, to the letter: `image_retrieval_recall@k` is text->image (the fraction of
captions whose image is among the k images scored highest for it); `text_retrieval_recall@k` is
image->text (the fraction of images with at least one of their own captions among the k captions scored
highest for it). Every caption is a query of its own, so an image with 5 captions counts 5 times in text->image.

Each rank embeds its share of the images and captions; the embeddings are gathered so every query is scored
against the whole set, each rank scores its own queries, and the hit counts are summed over ranks.
"""

from __future__ import annotations

import torch

from pretrain.evaluation.batches import all_sum, eval_batches, gather_rows, rank_offset
from webshards.evalset import EvalSet

RECALL_KS = (1, 5, 10)


def recall_hits(
    queries: torch.Tensor, candidates: torch.Tensor, positive, ks=RECALL_KS, chunk: int = 1024
) -> torch.Tensor:
    """For each k, how many queries have a positive candidate among their top-k by dot product.

    `positive(rows, topk)` says, for the query rows `rows` (a range) and their top-k candidate indices
    (rows x k), which of those are positives. k is capped at the number of candidates.
    """
    hits = torch.zeros(len(ks), dtype=torch.long, device=queries.device)
    kmax = min(max(ks), len(candidates))
    for start in range(0, len(queries), chunk):
        rows = torch.arange(start, min(start + chunk, len(queries)), device=queries.device)
        topk = (queries[rows] @ candidates.T).topk(kmax, dim=1).indices
        good = positive(rows, topk)
        for i, k in enumerate(ks):
            hits[i] += good[:, :k].any(dim=1).sum()
    return hits


def retrieval_recalls(
    images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor, ks=RECALL_KS
) -> dict[str, float]:
    """clip_benchmark's recall@k of L2-normalised `images` (n x d) and `texts` (m x d), where caption j
    belongs to image `text_image[j]`."""
    hits = _directions(images, texts, text_image, range(len(images)), range(len(texts)), ks)
    return _as_metrics(hits, len(images), len(texts), ks)


def _directions(images, texts, text_image, image_rows, text_rows, ks) -> tuple[torch.Tensor, torch.Tensor]:
    """Hit counts (text->image, image->text) of the given query rows against all candidates."""
    image_rows = torch.as_tensor(list(image_rows), dtype=torch.long, device=images.device)
    text_rows = torch.as_tensor(list(text_rows), dtype=torch.long, device=images.device)
    t2i = recall_hits(
        texts[text_rows], images, lambda rows, topk: topk == text_image[text_rows[rows]][:, None], ks
    )
    i2t = recall_hits(
        images[image_rows], texts, lambda rows, topk: text_image[topk] == image_rows[rows][:, None], ks
    )
    return t2i, i2t


def _as_metrics(hits: tuple[torch.Tensor, torch.Tensor], images: int, texts: int, ks) -> dict[str, float]:
    t2i, i2t = (h.tolist() for h in hits)
    return {
        **{f"image_retrieval_recall@{k}": t2i[i] / texts for i, k in enumerate(ks)},
        **{f"text_retrieval_recall@{k}": i2t[i] / images for i, k in enumerate(ks)},
    }


@torch.no_grad()
def run_retrieval(
    model, bundle, eval_set: EvalSet, device: torch.device, batch_size: int, split: bool, workers: int,
    name: str | None = None,
) -> dict:  # fmt: skip
    """Recall@1/5/10 both ways on `eval_set`, plus `samples` (images) and `captions`. `name`: the eval's, for
    its progress (`eval_batches`)."""
    images, texts, owner = _embed(model, bundle, eval_set, device, batch_size, split, workers, name)
    first_image, first_text = rank_offset(len(images), split), rank_offset(len(texts), split)
    text_image = gather_rows(owner + first_image, split)
    all_images, all_texts = gather_rows(images, split), gather_rows(texts, split)
    if len(all_images) == 0 or len(all_texts) == 0:
        raise ValueError(f"eval set {eval_set.root} holds no readable image with captions")
    image_rows = range(first_image, first_image + len(images))
    text_rows = range(first_text, first_text + len(texts))
    hits = _directions(all_images, all_texts, text_image, image_rows, text_rows, RECALL_KS)
    hits = tuple(all_sum(h, split) for h in hits)
    return {**_as_metrics(hits, len(all_images), len(all_texts), RECALL_KS), "samples": len(all_images),
            "captions": len(all_texts)}  # fmt: skip


def _embed(model, bundle, eval_set, device, batch_size, split, workers, name):
    """This rank's image and caption embeddings, and each caption's image (a row of this rank's images)."""
    image_parts, text_parts, owners, seen = [], [], [], 0
    batches = eval_batches(eval_set.spec, bundle, device, "captions", batch_size, split, workers, name)
    for batch, captions in batches:
        image_parts.append(model.encode_image(batch.to(device), normalize=True).float())
        flat = [c for per_image in captions for c in per_image]
        owners += [seen + i for i, per_image in enumerate(captions) for _ in per_image]
        if flat:
            text_parts.append(model.encode_text(bundle.tokenizer(flat).to(device), normalize=True).float())
        seen += len(captions)
    empty = torch.zeros(0, _embed_dim(model, bundle, image_parts, device), device=device)
    images = torch.cat(image_parts) if image_parts else empty
    texts = torch.cat(text_parts) if text_parts else empty
    return images, texts, torch.tensor(owners, dtype=torch.long, device=device)


def _embed_dim(model, bundle, parts: list[torch.Tensor], device: torch.device) -> int:
    """The embedding width, for the empty tensor of a rank that got no samples (its share of a set with
    fewer shards than ranks)."""
    if parts:
        return parts[0].shape[1]
    return model.encode_text(bundle.tokenizer([""]).to(device), normalize=True).shape[1]
