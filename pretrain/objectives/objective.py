"""The training objective: which loss a model trains with, split into the named parts the trainer logs.

The trainer names no concrete loss. `build_objective(cfg, model)` picks one from `loss.name` (or, when it
is null, from the model) and returns an `Objective`, which the trainer uses in one fixed way that keeps
gradient accumulation exact:

1. `contrastive(...)` is the pairwise term. It sees the features of *all* micro-batches of the step
   (the fresh micro-batch between the no-grad cached rest), so every accumulated sample is a negative;
   the trainer calls it once per micro-step, with gradients flowing only through that micro-batch's
   features, and the logit scale and bias get theirs only in the last micro-step. Its value is the
   term over the whole accumulated batch of this rank (the last micro-step's value is logged).
2. `per_micro(...)` returns the terms computed on one micro-batch alone (CoCa's caption cross-entropy;
   none for clip and siglip). The trainer sums them over the micro-steps. A rank's sum, averaged over
   ranks (strategies average gradients over ranks), must be the term over the global batch; a term
   normalised by a global count asks for it with `needs_token_count` (see there).
3. `total(parts)` is the weighted sum that is back-propagated and logged as `loss`; every part is also
   logged, as `loss_<part>`.

Terms added on top of a loss (`pretrain.objectives.distill`: a teacher's distillation term, ZSCL's reference-set
term) use three more hooks: `begin_step(micro)` sees the step's micro-batches once before the micro-steps
(a teacher encodes them there, without grad); `pairwise(...)` returns `contrastive` and every other term
over the accumulated features (`pairwise_parts`: like `contrastive`, their last micro-step's value is the
step's); `per_step(encode_images)` returns terms computed once per step in the last micro-step, on their
own inputs (`encode_images` runs the trained model's image tower with grad). `state_dict()` is the
objective's own resume state (a reference-data position), saved per rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import open_clip
import torch
from torch import nn

from pretrain.config import Config, ConfigError, LossConfig
from pretrain.loss import ClipLoss, SigLipLoss
from pretrain.loss.coca import PAD_ID, caption_loss, count_target_tokens
from pretrain.parallel.distributed import world

MODEL_KINDS = {
    "coca": "an open_clip CoCa model (contrastive + captioning)",
    "siglip": "a model with a logit bias (init_logit_bias)",
    "clip": "a CLIP model without a logit bias or a text decoder",
}
"""What makes a model belong to each loss, for the mismatch error."""


class Features(NamedTuple):
    """The contrastive inputs of one forward pass, read by name from the model's dict output (fp32)."""

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None

    def detached_scalars(self) -> Features:
        """The same features with the logit scale and bias cut from the graph (all micro-steps but the last)."""
        bias = None if self.logit_bias is None else self.logit_bias.detach()
        return self._replace(logit_scale=self.logit_scale.detach(), logit_bias=bias)


def features(output: dict) -> Features:
    """The features of an open_clip dict output (`output_dict=True`; CoCa always returns a dict), upcast
    to fp32 for the loss."""
    bias = output.get("logit_bias")
    return Features(
        output["image_features"].float(),
        output["text_features"].float(),
        output["logit_scale"].float(),
        None if bias is None else bias.float(),
    )


class Objective:
    """A loss in named parts: a contrastive part on all accumulated features and per-micro-batch parts.

    Subclasses set `name`, `parts` and the weight of each part, and implement `contrastive` (and, when
    they have per-micro-batch parts, `per_micro`).
    """

    name: str = ""
    """The `loss.name` this objective implements."""
    parts: tuple[str, ...] = ("contrastive",)
    """Names of the logged parts (`loss_<part>` in metrics.jsonl); "contrastive" first, always present."""
    pairwise_parts: tuple[str, ...] = ("contrastive",)
    """The parts `pairwise` returns: terms over all accumulated features, not summed over micro-steps."""
    needs_token_count: bool = False
    """True when `per_micro` needs `token_count`: the number of target tokens of the whole optimizer step
    (all micro-batches, all ranks), which the trainer asks `token_count` for before the micro-steps. A
    loss normalised by this global count (CoCa's caption cross-entropy) does not change when a batch is
    split across ranks or micro-steps, whatever the caption lengths."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = weights

    def contrastive(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """The pairwise term over this rank's accumulated features (negatives from all ranks)."""
        raise NotImplementedError

    def begin_step(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Called once per optimizer step with its (images, texts) micro-batches, before the micro-steps."""

    def pairwise(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """The `pairwise_parts` over this rank's accumulated features (the micro-batches in step order)."""
        return {"contrastive": self.contrastive(image_features, text_features, logit_scale, logit_bias)}

    def per_step(self, encode_images: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Terms computed once per step (in its last micro-step) on their own inputs; `encode_images` gives
        the trained model's (fp32, normalised) image features with grad."""
        return {}

    def state_dict(self) -> dict:
        """This rank's resume state of the objective (saved in its rank file)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`."""

    def close(self) -> None:
        """Release what the objective holds open (a reference-data stream)."""

    def per_micro(self, output: dict, texts: torch.Tensor, token_count: torch.Tensor | None) -> dict:
        """Terms of one micro-batch alone, from the model's dict `output` (bf16 under autocast) and its
        input tokens; `token_count` is the step's global target-token count when `needs_token_count`."""
        return {}

    def token_count(self, texts: list[torch.Tensor]) -> torch.Tensor:
        """The target tokens of the step's micro-batches `texts`, summed over all ranks (a device tensor;
        only when `needs_token_count`)."""
        raise NotImplementedError(f"loss.name={self.name} counts no target tokens")

    def total(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the parts: what is back-propagated and logged as `loss` (a micro-step sums
        the parts it has: per-step terms come only in the last)."""
        return sum(self.weights[name] * parts[name] for name in self.parts if name in parts)


class _OnlyContrastive(Objective):
    """An objective whose one part is a contrastive loss module built from `loss.chunk_size` (and `loss.ring`)."""

    def __init__(self, cfg: LossConfig) -> None:
        if cfg.clip_weight <= 0:
            raise ConfigError(f"loss.clip_weight: must be > 0 for loss.name={self.name} (its only part)")
        super().__init__({"contrastive": cfg.clip_weight})
        self.loss = self.build_loss(cfg)

    def build_loss(self, cfg: LossConfig) -> nn.Module:
        """The loss module, from `loss.chunk_size` (and `loss.ring` where it applies)."""
        raise NotImplementedError


class ClipObjective(_OnlyContrastive):
    """CLIP InfoNCE with negatives from all ranks (`pretrain.loss.ClipLoss`), in O(B) memory with
    `loss.chunk_size`, the other ranks' features passed around the ring with `loss.ring`."""

    name = "clip"

    def build_loss(self, cfg: LossConfig) -> nn.Module:
        return ClipLoss(cfg.chunk_size, ring=cfg.ring)

    def contrastive(self, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
        return self.loss(image_features, text_features, logit_scale)


class SigLipObjective(_OnlyContrastive):
    """The pairwise sigmoid loss with a learnable bias, texts passed around the ring of ranks
    (`pretrain.loss.SigLipLoss`), tiled by `loss.chunk_size`."""

    name = "siglip"

    def build_loss(self, cfg: LossConfig) -> nn.Module:
        if cfg.ring:  # loss.name was null: the model chose siglip
            raise ConfigError("loss.ring: is for clip and coca; siglip always passes texts around the ring")
        return SigLipLoss(cfg.chunk_size)

    def contrastive(self, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
        return self.loss(image_features, text_features, logit_scale, logit_bias)


class CoCaObjective(Objective):
    """CoCa: `loss.clip_weight` x InfoNCE with gathered negatives (as `clip`) + `loss.caption_weight` x the
    caption cross-entropy (teacher forcing, padding ignored) over the step's global target-token count,
    times the world size for DDP's gradient mean (`pretrain.loss.coca`)."""

    name = "coca"
    parts = ("contrastive", "caption")
    needs_token_count = True

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__({"contrastive": cfg.clip_weight, "caption": cfg.caption_weight})
        self.loss = ClipLoss(cfg.chunk_size, ring=cfg.ring)

    def contrastive(self, image_features, text_features, logit_scale, logit_bias) -> torch.Tensor:
        return self.loss(image_features, text_features, logit_scale)

    def per_micro(self, output: dict, texts: torch.Tensor, token_count: torch.Tensor | None) -> dict:
        logits = output["logits"].float()
        return {"caption": world()[1] * caption_loss(logits, output["labels"], PAD_ID, token_count)}

    def token_count(self, texts: list[torch.Tensor]) -> torch.Tensor:
        return count_target_tokens(texts, PAD_ID)


BUILDERS: dict[str, Callable[[LossConfig], Objective]] = {
    "clip": ClipObjective,
    "siglip": SigLipObjective,
    "coca": CoCaObjective,
}
"""The objective of each `loss.name` that is built."""


def model_objective(model: nn.Module) -> str:
    """The loss a model is built for: coca for open_clip CoCa models, siglip for models with a logit
    bias (`init_logit_bias` in their config), clip for the rest."""
    if isinstance(model, open_clip.CoCa):
        return "coca"
    if getattr(model, "logit_bias", None) is not None:
        return "siglip"
    return "clip"


def resolve_loss_name(cfg: Config, model: nn.Module) -> str:
    """`loss.name`, or the model's loss when it is null; a loss the model does not fit is a ConfigError."""
    fits = model_objective(model)
    name = cfg.loss.name or fits
    if name != fits:
        raise ConfigError(
            f"loss.name: {name} does not fit model {cfg.model.name!r}, {MODEL_KINDS[fits]} whose loss is "
            f"{fits}; set loss.name={fits} or leave it null"
        )
    return name


def build_objective(cfg: Config, model: nn.Module) -> Objective:
    """The objective for `cfg.loss` and the (unwrapped) `model`; a mismatch is a one-line ConfigError."""
    name = resolve_loss_name(cfg, model)
    if name not in BUILDERS:
        raise NotImplementedError(f"loss.name={name} is not built yet")
    return BUILDERS[name](cfg.loss)
