"""CoCa's caption cross-entropy (`pretrain/objectives/specs/coca.py` adds it to the contrastive `ClipLoss`).

open_clip's CoCa forward teacher-forces the text decoder: `labels = text[:, 1:]` and `logits[:, i]` predicts
`labels[:, i]`; padding (`pad_id`, 0 for open_clip's tokenizer) is ignored, as in open_clip's `CoCaLoss`
(`ignore_index=pad_id`). open_clip averages the token cross-entropies over one batch's own non-pad targets,
so a batch split across ranks or micro-steps would weigh a short caption's tokens more on one rank than on
another. Here the summed token cross-entropies are divided by the number of target tokens of the whole step
(all micro-batches, all ranks): splitting the batch then changes nothing, whatever the caption lengths.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pretrain.parallel.distributed import world

PAD_ID = 0  # open_clip's SimpleTokenizer pads with 0; CoCa's `pad_id` defaults to it


def count_target_tokens(texts: Sequence[torch.Tensor] | torch.Tensor, pad_id: int = PAD_ID) -> torch.Tensor:
    """Number of positions that contribute to the caption loss over one optimizer step.

    `texts`: the token tensors of every micro-batch of this rank (or one tensor). The targets are
    `text[:, 1:]` (the start token is never predicted) minus padding. Summed locally, then over ranks
    when a process group is initialised, so every rank gets the same global count (int64 tensor).
    """
    if isinstance(texts, torch.Tensor):
        texts = [texts]
    if not texts:
        raise ValueError("count_target_tokens needs at least one micro-batch of texts")
    count = sum((t[:, 1:] != pad_id).sum() for t in texts).to(torch.int64)
    if world()[1] > 1:
        dist.all_reduce(count)
    return count


def caption_loss(
    logits: torch.Tensor, labels: torch.Tensor, pad_id: int, token_count: torch.Tensor | int
) -> torch.Tensor:
    """Summed token cross-entropy of `logits` (B, L, V) against `labels` (B, L), padding ignored, divided
    by `token_count` (from `count_target_tokens`, the step's global number of targets).

    With one process and `token_count` the batch's own count, this is open_clip's caption loss. Summed
    over micro-batches it is the caption loss of the step's whole batch on this rank's share. Under DDP,
    which AVERAGES gradients over W ranks, the per-rank loss must be multiplied by W (as the `coca` objective does)
    for W ranks x B to train exactly like 1 rank x W*B; the mean over ranks of the W-scaled values is then
    the global caption loss, the same convention as `ClipLoss`.
    """
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=pad_id, reduction="sum"
    )
    count = torch.as_tensor(token_count, device=total.device)
    return total / count.clamp_min(1).to(total.dtype)  # all-pad batches: 0, not NaN
