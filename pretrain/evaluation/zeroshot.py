"""Zero-shot classification: class prompts become a linear classifier over image embeddings.

The eval folder is what `data-tools demo-data` writes: `classnames.txt`, `templates.txt` (one prompt per
line with `{}` for the class name) and labelled shards in `eval/` (KEY.cls holds the class index). The
shards are read by the training pipeline in `eval` mode: in order, each sample once across all ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip import build_zero_shot_classifier

from pretrain.config import DataConfig
from pretrain.distributed import world
from webshards.layout import list_shards


def read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"zero-shot eval needs {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def eval_spec(folder: Path) -> str:
    """The labelled shards of an eval folder as a spec (`::`-joined paths)."""
    shard_dir = folder / "eval" if (folder / "eval").is_dir() else folder
    shards = list_shards(shard_dir)
    if not shards:
        raise FileNotFoundError(f"no complete shards in {shard_dir}")
    return "::".join(str(s) for s in shards)


@torch.no_grad()
def run_zeroshot(
    model, bundle, folder: str | Path, device: torch.device, batch_size: int = 256, split: bool = False,
    workers: int = 0,
) -> dict:  # fmt: skip
    """Top-1 / top-5 accuracy of `model` on the labelled eval shards in `folder`.

    With `split`, each rank of the process group evaluates its share of the shards and the counts are
    summed; otherwise this process evaluates everything.
    """
    from pretrain.data.loader import WebDatasetSource

    folder = Path(folder)
    classnames, templates = read_lines(folder / "classnames.txt"), read_lines(folder / "templates.txt")
    rank, size = world() if split else (0, 1)
    was_training = model.training
    model.eval()
    classifier = build_zero_shot_classifier(model, bundle.tokenizer, classnames, templates, device=device)
    data_cfg = DataConfig(workers=workers)
    source = WebDatasetSource(
        eval_spec(folder), data_cfg, "eval", 0, batch_size, rank, size, bundle, device, labels=True
    )
    counts = torch.zeros(3, dtype=torch.long, device=device)  # top-1 hits, top-5 hits, samples
    k = min(5, len(classnames))
    for images, labels in eval_batches(source):
        topk = (model.encode_image(images.to(device), normalize=True) @ classifier).topk(k, dim=1).indices
        hits = topk == labels.to(device)[:, None]
        counts += torch.stack(
            [hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels), device=device)]
        )
    if size > 1:
        torch.distributed.all_reduce(counts)
    model.train(was_training)
    top1, top5, total = counts.tolist()
    return {"top1": top1 / total, "top5": top5 / total, "samples": total}


def eval_batches(source):
    """The batches of an eval source until it ends; the source is closed at the end."""
    try:
        while True:
            yield source.next_batch()
    except StopIteration:
        source.close()
