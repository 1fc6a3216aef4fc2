"""The objectives' loss functions, one module each: `clip` (InfoNCE with gathered negatives), `siglip`
(pairwise sigmoid) and `coca` (the caption cross-entropy). `pretrain.loss.ClipLoss` is the contract's
import path."""

from pretrain.loss.clip import ClipLoss
from pretrain.loss.coca import caption_loss, count_target_tokens
from pretrain.loss.siglip import SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss", "caption_loss", "count_target_tokens"]
