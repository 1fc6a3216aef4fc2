"""The optimizer (`train.optimizer`: AdamW or one of timm's) over our parameter groups (param_groups.py), and
the learning-rate schedules (warmup, then cosine, constant, or constant with a cooldown: the shapes of
open_clip_train's scheduler.py), which scale each group's own base rate."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from pretrain.config import ConfigError, TrainConfig
from pretrain.training.fast import build_adamw
from pretrain.training.param_groups import param_groups

log = logging.getLogger("pretrain")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """`train.optimizer` over our parameter groups: AdamW (fused per `train.fused_adamw`), or a timm optimizer."""
    groups = param_groups(model, cfg)
    if cfg.optimizer == "adamw":
        return build_adamw(groups, cfg)
    return build_timm_optimizer(groups, cfg)


def build_timm_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer `train.optimizer` = `timm/NAME` (open_clip_train's `--opt timm/NAME`), built by timm's
    factory on our groups with timm's defaults for it, and `train.optimizer_kwargs` over them (betas, eps,
    momentum, ...: their meaning differs between optimizers, so AdamW's `train.beta1/beta2/eps` stay AdamW's)."""
    from timm.optim import create_optimizer_v2

    name = cfg.optimizer.removeprefix("timm/")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.optimizer_kwargs.items()}
    try:
        optimizer = create_optimizer_v2(groups, name, lr=cfg.lr, weight_decay=cfg.weight_decay, **options)
    except ImportError as e:  # timm's bitsandbytes / apex optimizers need those packages
        raise ConfigError(
            f"train.optimizer: {cfg.optimizer} needs a package not installed here: {e}"
        ) from None
    except TypeError as e:  # a keyword this optimizer does not take
        raise ConfigError(f"train.optimizer_kwargs: {e}") from None
    log.info(
        "optimizer: %s (timm, %s, %s)", type(optimizer).__name__, cfg.optimizer, options or "timm's defaults"
    )
    return optimizer


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of each group's base rate at optimizer step `step` (0-based): linear warmup, then
    `cfg.schedule`. `min_lr` and `cooldown_end_lr` are fractions of `cfg.lr`, so they scale with a group's
    rate (as open_clip's `lr_scale` scales the whole schedule)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "const":
        return 1.0
    if cfg.schedule == "const_cooldown":
        return _cooldown_factor(step, cfg)
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr / cfg.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _cooldown_factor(step: int, cfg: TrainConfig) -> float:
    """Constant until the last `cooldown_steps`, then (1 - progress) ** power from lr towards
    `cooldown_end_lr` (open_clip_train's const_lr_cooldown; progress 0 at the first cooldown step)."""
    start = cfg.steps - cfg.cooldown_steps
    if step < start:
        return 1.0
    progress = min(1.0, (step - start) / cfg.cooldown_steps)
    end = cfg.cooldown_end_lr / cfg.lr
    return (1 - progress) ** cfg.cooldown_power * (1 - end) + end


class StepSchedule(torch.optim.lr_scheduler.LambdaLR):
    """`base * lr_factor(step, cfg)` for every parameter group (its base: `train.lr`, or its tower's rate
    scaled by layer decay), a pure function of the step and this run's config: of a checkpoint's scheduler
    state only the step count is kept. Loading it sets every group's rate for the next step from this run's
    settings, so a run resumed with more `train.steps` (or another `train.lr`, tower rate, layer decay,
    warmup, schedule, ...) continues exactly as a run started with them would, from the first resumed step
    on. Without this, the groups would keep the rate the optimizer state saved (the old schedule's, e.g. 0 at
    the end of its cosine) for one step, and the base rates the saved schedule held."""

    def load_state_dict(self, state_dict: dict) -> None:
        base_lrs = list(self.base_lrs)  # this run's group rates, not the saved ones
        super().load_state_dict(state_dict)
        self.base_lrs = base_lrs
        for group, base, factor in zip(self.optimizer.param_groups, base_lrs, self.lr_lambdas, strict=True):
            group["initial_lr"], group["lr"] = base, base * factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> StepSchedule:
    """The schedule, restored after the optimizer (whose saved state holds the old rates)."""
    return StepSchedule(optimizer, lambda step: lr_factor(step, cfg))
