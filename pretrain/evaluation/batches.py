"""An eval set's samples for this rank, as batches, and gathering per-rank rows for evaluators that need
every embedding (retrieval, the validation loss).

Eval shards go through the training pipeline in `eval` mode: in order, shards dealt round-robin to the
ranks (and their loader workers), so each sample is read exactly once across all ranks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from pretrain.config import DataConfig
from pretrain.distributed import world


def eval_batches(
    spec: str, bundle, device: torch.device, targets: str, batch_size: int, split: bool, workers: int = 0
) -> Iterator[tuple[torch.Tensor, object]]:
    """`(images, targets)` batches of the shards in `spec`: this rank's share with `split`, else all of them."""
    from pretrain.data.loader import WebDatasetSource

    rank, size = world() if split else (0, 1)
    source = WebDatasetSource(
        spec, DataConfig(workers=workers), "eval", 0, batch_size, rank, size, bundle, device, targets=targets
    )
    try:
        while True:
            try:
                yield source.next_batch()
            except StopIteration:
                return
    finally:
        source.close()


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
