"""CLIP InfoNCE with negatives gathered from every rank.

Each rank scores its local rows against the columns of all ranks (open_clip's `--local-loss
--gather-with-grad`): memory grows with the local batch times the global batch, not the global batch
squared, and because the gather carries gradients, W ranks x batch B train exactly like 1 rank x W*B.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.distributed import all_gather_with_grad, world
from pretrain.loss.tiling import RowTiledLoss


def _directional_ce(
    queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Summed cross-entropy of `queries` against every row of `keys` (the positives at `labels`)."""
    return F.cross_entropy(scale * queries @ keys.T, labels, reduction="sum")


class ClipLoss(RowTiledLoss):
    """Symmetric InfoNCE over the global batch.

    `chunk_size` tiles the local rows: each tile's logits are recomputed in backward instead of stored,
    so activation memory is `chunk_size x global_batch` rather than `local_batch x global_batch`.
    """

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        rank, _ = world()
        n = image_features.shape[0]
        all_images = all_gather_with_grad(image_features)
        all_texts = all_gather_with_grad(text_features)
        labels = torch.arange(n, device=image_features.device) + rank * n
        total = image_features.new_zeros(())
        for rows in self.row_tiles(n):
            total = total + self._tile(
                image_features[rows], text_features[rows], all_images, all_texts, labels[rows], logit_scale
            )
        return total / (2 * n)

    def _tile(self, img, txt, all_images, all_texts, labels, scale) -> torch.Tensor:
        def both(img, txt, all_images, all_texts, scale):
            return _directional_ce(img, all_texts, labels, scale) + _directional_ce(
                txt, all_images, labels, scale
            )

        return self.tile(both, img, txt, all_images, all_texts, scale)
