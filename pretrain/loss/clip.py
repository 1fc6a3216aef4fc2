"""CLIP InfoNCE with negatives from every rank.

Each rank scores its local rows against the columns of all ranks (open_clip's `--local-loss
--gather-with-grad`), and because gradients flow back to the rank that owns each column, W ranks x batch B
train exactly like 1 rank x W*B.

Without `chunk_size` this is the plain computation: the `n x N` logits of the local rows against the
gathered columns, stored for backward. With `chunk_size` it is the O(B)-memory form of
`pretrain.loss.tiled_clip`: log-sum-exps over `chunk x chunk` blocks, recomputed in backward, the columns
all-gathered or, with `ring=True`, passed around the ring of ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.loss.tiled_clip import tiled_loss_sum
from pretrain.loss.tiling import ChunkedLoss
from pretrain.parallel.distributed import all_gather_with_grad, world


def _directional_ce(
    queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Summed cross-entropy of `queries` against every row of `keys` (the positives at `labels`)."""
    return F.cross_entropy(scale * queries @ keys.T, labels, reduction="sum")


class ClipLoss(ChunkedLoss):
    """Symmetric InfoNCE over the global batch.

    `chunk_size` (None: the plain loss) bounds memory by blocks of `chunk_size x chunk_size` logits: what
    the loss keeps for backward grows linearly with the batch. `ring` (needs `chunk_size`) passes the other
    ranks' features peer-to-peer around the ring instead of all-gathering them, so one other rank's block is
    held at a time. All ranks must use the same local batch size.
    """

    def __init__(self, chunk_size: int | None = None, *, ring: bool = False) -> None:
        super().__init__(chunk_size)
        if ring and chunk_size is None:
            raise ValueError("ClipLoss(ring=True) needs a chunk_size: the ring is part of the tiled loss")
        self.ring = ring

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        if self.chunk_size is None:
            return self._plain(image_features, text_features, logit_scale)
        total = tiled_loss_sum(image_features, text_features, logit_scale, self.chunk_size, self.ring)
        return total / (2 * image_features.shape[0])

    def _plain(self, image_features, text_features, logit_scale) -> torch.Tensor:
        rank, _ = world()
        n = image_features.shape[0]
        all_images = all_gather_with_grad(image_features)
        all_texts = all_gather_with_grad(text_features)
        labels = torch.arange(n, device=image_features.device) + rank * n
        both = _directional_ce(image_features, all_texts, labels, logit_scale) + _directional_ce(
            text_features, all_images, labels, logit_scale
        )
        return both / (2 * n)
