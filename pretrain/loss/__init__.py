"""Training objectives' losses, one module each: `clip` (InfoNCE with gathered negatives), and the
SigLIP and CoCa losses as they land. `pretrain.loss.ClipLoss` is the contract's import path."""

from pretrain.loss.clip import ClipLoss
from pretrain.loss.coca import CoCaLoss, caption_loss, count_target_tokens
from pretrain.loss.siglip import SigLipLoss

__all__ = ["ClipLoss", "CoCaLoss", "SigLipLoss", "caption_loss", "count_target_tokens"]
