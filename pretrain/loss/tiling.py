"""The `chunk_size` both contrastive losses take: None for the plain computation, else the side of the
logit blocks they score one at a time and recompute in backward (`pretrain.loss.blocks`)."""

from __future__ import annotations

from torch import nn


class ChunkedLoss(nn.Module):
    """A loss module with a validated `chunk_size` (None: the plain, untiled loss)."""

    def __init__(self, chunk_size: int | None = None) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = chunk_size
