"""AdamW with CLIP's parameter groups, and the learning-rate schedules (warmup, then cosine, constant, or
constant with a cooldown: the shapes of open_clip_train's scheduler.py)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config import TrainConfig
from pretrain.training.fast import build_adamw


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Gains, biases, norms and the logit scale are not decayed (as in CLIP and open_clip)."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decayed and undecayed trainable parameters; locked ones (requires_grad False) are in neither, so
    the optimizer keeps no state for them. A group left empty by locking is dropped."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return build_adamw(param_groups(model, cfg.weight_decay), cfg)  # fused per train.fused_adamw


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of `cfg.lr` at optimizer step `step` (0-based): linear warmup, then `cfg.schedule`."""
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
    """`cfg.lr * lr_factor(step, cfg)` for every parameter group, a pure function of the step and this run's
    config: of a checkpoint's scheduler state only the step count is kept. Loading it sets every group's
    rate for the next step from this run's settings, so a run resumed with more `train.steps` (or another
    `train.lr`, warmup, schedule, ...) continues exactly as a run started with them would, from the first
    resumed step on. Without this, the groups would keep the rate the optimizer state saved (the old
    schedule's, e.g. 0 at the end of its cosine) for one step, and the base rates the saved schedule held."""

    def load_state_dict(self, state_dict: dict) -> None:
        base_lrs = list(self.base_lrs)  # this run's `train.lr`, not the saved one
        super().load_state_dict(state_dict)
        self.base_lrs = base_lrs
        for group, base, factor in zip(self.optimizer.param_groups, base_lrs, self.lr_lambdas, strict=True):
            group["initial_lr"], group["lr"] = base, base * factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> StepSchedule:
    """The schedule, restored after the optimizer (whose saved state holds the old rates)."""
    return StepSchedule(optimizer, lambda step: lr_factor(step, cfg))
