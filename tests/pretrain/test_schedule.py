"""Learning-rate schedules (`train.schedule`): every step's rate equals open_clip_train's scheduler.py and an
independent transcription of its formulas, warmup included; a cooldown that does not fit is one line."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TINY

from pretrain.config import ConfigError, TrainConfig, load_config
from pretrain.training.optim import build_scheduler

STEPS, WARMUP, LR = 40, 5, 1e-3


def reference_lr(
    step: int, schedule: str, cooldown: int = 0, power: float = 1.0, end_lr: float = 0.0
) -> float:
    """open_clip_train's const_lr / const_lr_cooldown / cosine_lr (min_lr 0), written out here."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    if schedule == "const":
        return LR
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP) / (STEPS - WARMUP))) * LR
    start = STEPS - cooldown
    if step < start:
        return LR
    return (1 - (step - start) / (STEPS - start)) ** power * (LR - end_lr) + end_lr


def open_clip_lr(
    step: int, schedule: str, cooldown: int = 0, power: float = 1.0, end_lr: float = 0.0
) -> float:
    """The same rate from open_clip_train's own scheduler functions."""
    from open_clip_train import scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    if schedule == "const_cooldown":
        adjust = scheduler.const_lr_cooldown(optimizer, LR, WARMUP, STEPS, cooldown, power, end_lr)
    else:
        adjust = {"const": scheduler.const_lr, "cosine": scheduler.cosine_lr}[schedule](
            optimizer, LR, WARMUP, STEPS
        )
    return adjust(step)


def our_lrs(cfg: TrainConfig) -> list[float]:
    """The rate each optimizer step uses, read off the scheduler as the trainer does (before stepping)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler, lrs = build_scheduler(optimizer, cfg), []
    for _ in range(cfg.steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


CASES = [
    ("const", {}),
    ("cosine", {}),
    ("const_cooldown", {"cooldown_steps": 10}),
    ("const_cooldown", {"cooldown_steps": 35, "cooldown_power": 2.0, "cooldown_end_lr": 1e-4}),
    ("const_cooldown", {"cooldown_steps": 1, "cooldown_power": 0.5}),
]


@pytest.mark.parametrize(("schedule", "keys"), CASES)
def test_schedule_equals_open_clip_at_every_step(schedule, keys):
    cfg = TrainConfig(steps=STEPS, warmup_steps=WARMUP, lr=LR, schedule=schedule, **keys)
    args = (keys.get("cooldown_steps", 0), keys.get("cooldown_power", 1.0), keys.get("cooldown_end_lr", 0.0))
    ours = our_lrs(cfg)
    for step, lr in enumerate(ours):
        assert lr == pytest.approx(reference_lr(step, schedule, *args), rel=1e-12, abs=1e-15), step
        assert lr == pytest.approx(open_clip_lr(step, schedule, *args), rel=1e-12, abs=1e-15), step
    if schedule != "cosine":
        assert max(ours) == pytest.approx(LR)  # the plateau is the peak rate


def test_default_schedule_is_cosine_to_min_lr():
    cfg = TrainConfig(steps=STEPS, warmup_steps=WARMUP, lr=LR, min_lr=1e-4)
    floor = 1e-4
    expected = [
        floor + (LR - floor) * 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (STEPS - WARMUP)))
        for s in range(WARMUP, STEPS)
    ]
    assert our_lrs(cfg)[WARMUP:] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.schedule=step"], "train.schedule: must be one of"),
        (["train.schedule=const_cooldown"], "train.cooldown_steps: must be in 1..18"),
        (
            ["train.schedule=const_cooldown", "train.cooldown_steps=19"],
            "train.cooldown_steps: must be in 1..18",
        ),
        (["train.cooldown_steps=5"], "train.cooldown_steps: only applies to train.schedule=const_cooldown"),
        (
            ["train.schedule=const_cooldown", "train.cooldown_steps=5", "train.cooldown_power=0"],
            "cooldown_power",
        ),
        (
            ["train.schedule=const_cooldown", "train.cooldown_steps=5", "train.cooldown_end_lr=-1"],
            "cooldown_end_lr",
        ),
    ],
)
def test_bad_schedule_is_one_line(overrides, message):
    """configs/tiny.yaml: 20 steps, 2 of warmup, so a cooldown has 1..18 steps."""
    with pytest.raises(ConfigError) as err:
        load_config(TINY, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
