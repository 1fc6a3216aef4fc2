"""Row tiling shared by the contrastive losses: `chunk_size` local rows at a time, each tile's logits
recomputed in backward instead of stored, so activation memory scales with the tile, not the local batch."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class RowTiledLoss(nn.Module):
    """A loss over this rank's rows that `chunk_size` (None: one tile) splits into recomputed tiles."""

    def __init__(self, chunk_size: int | None = None) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size

    def row_tiles(self, n: int) -> list[slice]:
        """The row slices of `n` local rows, `chunk_size` at a time."""
        step = self.chunk_size or n
        return [slice(start, start + step) for start in range(0, n, step)]

    def tile(self, fn: Callable[..., torch.Tensor], *args) -> torch.Tensor:
        """`fn(*args)`, recomputed in backward when tiling with gradients on."""
        if self.chunk_size is None or not torch.is_grad_enabled():
            return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False)
