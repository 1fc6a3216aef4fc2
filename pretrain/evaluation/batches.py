"""An eval set's samples for this rank, as batches, and gathering per-rank rows for evaluators that need
every embedding (retrieval, the validation loss).

Eval shards go through the training pipeline in `eval` mode: in order, shards dealt round-robin to the
ranks (and their loader workers), so each sample is read exactly once across all ranks. Rank 0 shows the
progress of its share in shards (the unit an eval set's size is known in) and samples, through the
project's one progress mechanism: a bar on a terminal, else a line every `PROGRESS_EVERY` seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
import torch.distributed as dist

from pretrain.config import DataConfig
from pretrain.parallel.distributed import world
from webshards.progress import Progress

log = logging.getLogger("pretrain")


def eval_batches(
    spec: str, bundle, device: torch.device, targets: str, batch_size: int, split: bool, workers: int = 0,
    name: str | None = None,
) -> Iterator[tuple[torch.Tensor, object]]:  # fmt: skip
    """`(images, targets)` batches of the shards in `spec`: this rank's share with `split`, else all of them.
    `name`: the eval's, for rank 0's progress (`eval NAME: 3/10 shards (30%), 2,400 samples, …`); None shows
    none (a caller that counts its own)."""
    from pretrain.data.loader import WebDatasetSource

    rank, size = world() if split else (0, 1)
    source = WebDatasetSource(
        spec, DataConfig(workers=workers), "eval", 0, batch_size, rank, size, bundle, device, targets=targets
    )
    try:
        if name is None or world()[0] != 0:
            yield from _batches(source)
        else:
            yield from _counted(source, f"eval {name}" + (f" (rank 0 of {size})" if size > 1 else ""))
    finally:
        source.close()


def _batches(source) -> Iterator[tuple[torch.Tensor, object]]:
    while True:
        try:
            yield source.next_batch()
        except StopIteration:
            return


def _counted(source, desc: str) -> Iterator[tuple[torch.Tensor, object]]:
    """The source's batches, counted in a `Progress` of this rank's shards: those read to the end, by each
    batch's last sample, then all of them when the pass is over. `brief`: an eval quicker than one
    `PROGRESS_EVERY` interval adds no line (its result line follows at once). No `ticking()` thread: batches
    arrive often enough to tick, and the loader's workers must not fork while a thread writes."""
    total = source.eval_shards
    with Progress(desc, total, "shards", "samples", logger=log, brief=True) as progress:
        for images, targets in _batches(source):
            progress.update(source.shards_finished - progress.done, samples=len(images))
            yield images, targets
        progress.update(total - progress.done)


def gather_rows(tensor: torch.Tensor, split: bool) -> torch.Tensor:
    """Every rank's rows of `tensor` concatenated in rank order (ranks may hold different counts); the tensor
    itself when this process evaluated everything."""
    if not split or world()[1] == 1:
        return tensor
    parts: list = [None] * world()[1]
    dist.all_gather_object(parts, tensor.cpu())
    return torch.cat(parts).to(tensor.device)


def all_sum(tensor: torch.Tensor, split: bool) -> torch.Tensor:
    """The sum over ranks of per-rank counts (in place); unchanged when this process evaluated everything."""
    if split and world()[1] > 1:
        dist.all_reduce(tensor)
    return tensor


def rank_offset(count: int, split: bool) -> int:
    """How many rows the ranks before this one hold (this rank's first row in `gather_rows` order)."""
    if not split or world()[1] == 1:
        return 0
    counts: list = [None] * world()[1]
    dist.all_gather_object(counts, count)
    return sum(counts[: world()[0]])
