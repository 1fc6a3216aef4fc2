"""`clip`: InfoNCE with negatives from all ranks (`pretrain.loss.ClipLoss`), in O(B) memory with
`loss.chunk_size`, the other ranks' features passed around the ring with `loss.ring`."""

import open_clip

from pretrain.loss import ClipLoss
from pretrain.objectives.objective import Objective, ObjectiveSpec

SPEC = ObjectiveSpec(
    name="clip",
    models="a CLIP model without a logit bias or a text decoder",
    fits=lambda model: not isinstance(model, open_clip.CoCa) and getattr(model, "logit_bias", None) is None,
    fields=("clip_weight", "chunk_size", "ring"),
    build=lambda cfg: Objective(ClipLoss(cfg.chunk_size, ring=cfg.ring), cfg.clip_weight),
    default=True,
)
