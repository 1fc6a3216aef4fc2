"""`siglip`: the pairwise sigmoid loss with a learnable bias, texts passed around the ring of ranks
(`pretrain.loss.SigLipLoss`), tiled by `loss.chunk_size`."""

import open_clip

from pretrain.loss import SigLipLoss
from pretrain.objectives.objective import Objective, ObjectiveSpec

SPEC = ObjectiveSpec(
    name="siglip",
    models="a model with a logit bias (init_logit_bias)",
    fits=lambda model: (
        not isinstance(model, open_clip.CoCa) and getattr(model, "logit_bias", None) is not None
    ),
    fields=("clip_weight", "chunk_size"),
    build=lambda cfg: Objective(SigLipLoss(cfg.chunk_size), cfg.clip_weight, takes_bias=True),
    default=True,
    unread={"ring": "always passes texts around the ring"},
)
