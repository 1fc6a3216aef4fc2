"""`coca`: `loss.clip_weight` x InfoNCE with gathered negatives (as `clip`) + `loss.caption_weight` x the
caption cross-entropy (teacher forcing, padding ignored) over the step's global target-token count, times the
world size for the strategies' gradient mean (`pretrain.loss.coca`)."""

import open_clip
import torch

from pretrain.loss import ClipLoss
from pretrain.loss.coca import PAD_ID, caption_loss, count_target_tokens
from pretrain.objectives.objective import MicroStep, Objective, ObjectiveSpec, Term
from pretrain.parallel.distributed import world


class Caption(Term):
    """The caption cross-entropy of one micro-batch, normalised by the step's global target-token count."""

    name, when = "caption", "micro"

    def begin_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.token_count = count_target_tokens([texts for _, texts in micro], PAD_ID)

    def __call__(self, step: MicroStep) -> torch.Tensor:
        logits = step.output["logits"].float()
        return world()[1] * caption_loss(logits, step.output["labels"], PAD_ID, self.token_count)


SPEC = ObjectiveSpec(
    name="coca",
    models="an open_clip CoCa model (contrastive + captioning)",
    fits=lambda model: isinstance(model, open_clip.CoCa),
    fields=("clip_weight", "caption_weight", "chunk_size", "ring"),
    build=lambda cfg: Objective(
        ClipLoss(cfg.chunk_size, ring=cfg.ring), cfg.clip_weight, [Caption(cfg.caption_weight)]
    ),
    default=True,
)
