"""`train.*`: steps, batch, precision, the optimizer and its learning rates, and the schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pretrain.config_sections.base import PRECISIONS, SCHEDULES, _check, close_matches


def timm_optimizer_names() -> list[str]:
    """`timm/NAME` for every optimizer timm's factory builds (imports timm: only asked for a non-default)."""
    from timm.optim import list_optimizers

    return [f"timm/{name}" for name in list_optimizers()]


DEEPSPEED_TIMM_OPTIMIZERS = (
    "adam", "adamw", "nadam", "nadamw", "radam", "radamw", "adamax", "adabelief", "adan", "adanw", "laprop",
    "lion", "sgd", "momentum", "nesterov", "sgdw", "rmsprop", "rmsproptf", "adagrad", "adadelta",
)  # fmt: skip
"""timm optimizers whose update is elementwise: DeepSpeed ZeRO steps the optimizer on flat partitions of
many tensors, which changes the update of any optimizer that reads a whole tensor (LAMB/LARS trust ratios,
Adafactor's factored moments, the cautious variants' masks, Muon's orthogonalisation)."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run in total."""
    batch_size: int = 16
    """Samples per rank per micro-step."""
    accum_steps: int = 1
    """Micro-steps per optimizer step; all accumulated samples are negatives for each other."""
    seed: int = 0
    """Seed of the model init, the synthetic data and the shard order."""
    precision: str = "fp32"
    """fp32 or bf16 (autocast; also on CPU)."""
    lr: float = 5e-4
    """Peak learning rate, reached after `warmup_steps` (image_lr / text_lr: the towers' own)."""
    min_lr: float = 0.0
    """Floor of the cosine schedule (for a group of another base rate, scaled with it)."""
    warmup_steps: int = 10
    """Steps of linear warmup up to `lr`."""
    weight_decay: float = 0.2
    """Applied to weight matrices only; gains, biases and the logit scale get none."""
    beta1: float = 0.9
    """AdamW beta1 (a timm optimizer takes its betas from optimizer_kwargs)."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    weight_ensemble_every: int = 0
    """Weight ensembling (ZSCL's WE): every N steps fold the weights into a running average that starts
    from the initial weights (`pretrain export --weights ensemble` exports it); 0: off."""

    # Learning-rate schedule shapes (open_clip_train's scheduler.py); warmup comes first in each.
    schedule: str = "cosine"
    """cosine (down to min_lr), const (lr after warmup) or const_cooldown (lr, then a cooldown over the
    last cooldown_steps)."""
    cooldown_steps: int = 0
    """const_cooldown: steps of the final decay from lr to cooldown_end_lr."""
    cooldown_power: float = 1.0
    """const_cooldown: shape of the decay, (1 - progress) ** power (1: linear)."""
    cooldown_end_lr: float = 0.0
    """const_cooldown: the learning rate the cooldown decays towards."""
    compile: bool = False
    """torch.compile each transformer block (after activation checkpointing, before sharding) and the
    contrastive loss."""
    fused_adamw: str = "auto"
    """auto (fused AdamW when every trainable parameter is on CUDA, else torch's default), true or false."""

    # The optimizer and per-group rates (open_clip_train's --opt and --image/--text-layer-decay, EVA-CLIP's
    # --visual-lr/--text-lr): each group keeps its own base rate through warmup, schedule and resume.
    optimizer: str = "adamw"
    """adamw (torch's AdamW with beta1, beta2, eps), or timm/NAME for an optimizer of timm's factory
    (open_clip_train's --opt), e.g. timm/lamb, timm/lion, timm/adafactor, with timm's defaults for it."""
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    """timm/NAME only: keyword arguments of the optimizer over timm's defaults (open_clip_train's --opt-kwargs),
    e.g. {betas: [0.9, 0.99], eps: 1.0e-8, momentum: 0.9}."""
    wd_exclude: list[str] = field(default_factory=list)
    """Parameter-name patterns (fnmatch, full names, e.g. `*pos_embed*`, `visual.proj*`) that get no weight decay,
    on top of the default rule (gains, biases, norms, the logit scale): open_clip_train's --wd-exclude."""
    image_lr: float | None = None
    """Peak rate of the image tower (null: lr); the logit scale/bias and anything outside both towers keep lr."""
    text_lr: float | None = None
    """Peak rate of the text tower (null: lr); CoCa's text decoder is outside it and keeps lr."""
    image_layer_decay: float = 1.0
    """Layer-wise rate decay of the image tower (EVA-CLIP's --visual-ld): embeddings are layer 0, block i layer
    i+1, the head layer N+1; a layer's rate is image_lr x decay ** (N+1 - layer); a timm tower is numbered by
    its trunk's group_matcher. 1.0: off."""
    text_layer_decay: float = 1.0
    """Layer-wise rate decay of the text tower, numbered as image_layer_decay's (EVA-CLIP's --text-ld). 1.0: off."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "accum_steps"):
            value = getattr(self, name)
            _check(value > 0, f"train.{name}", f"must be > 0, got {value}")
        _check(
            self.precision in PRECISIONS,
            "train.precision",
            f"must be one of {PRECISIONS}, got {self.precision!r}",
        )
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _check(
            self.weight_ensemble_every >= 0,
            "train.weight_ensemble_every",
            f"must be >= 0 (0: off), got {self.weight_ensemble_every}",
        )
        _check(
            self.device in ("auto", "cpu", "cuda"),
            "train.device",
            f"must be auto, cpu or cuda, got {self.device!r}",
        )
        self._check_schedule()
        self._check_optimizer()
        self.fused_adamw = str(self.fused_adamw).lower()  # YAML and overrides make `true` a bool
        _check(
            self.fused_adamw in ("auto", "true", "false"),
            "train.fused_adamw",
            f"must be auto, true or false, got {self.fused_adamw!r}",
        )

    def _check_optimizer(self) -> None:
        """A known optimizer name (timm's list read only when one of its names is asked for), positive
        tower rates, layer decays in (0, 1]."""
        if self.optimizer != "adamw":
            choices = ["adamw", *timm_optimizer_names()]
            wrapped = self.optimizer.replace("timm/lookahead_", "timm/", 1)  # timm's Lookahead around one
            _check(
                wrapped in choices,
                "train.optimizer",
                f"unknown {self.optimizer!r}{close_matches(self.optimizer, choices)}; choices: {', '.join(choices)}",
            )
        _check(
            self.optimizer != "adamw" or not self.optimizer_kwargs,
            "train.optimizer_kwargs",
            "only for train.optimizer=timm/NAME (AdamW takes train.beta1, train.beta2, train.eps)",
        )
        for name in ("image_lr", "text_lr"):
            value = getattr(self, name)
            _check(
                value is None or value > 0, f"train.{name}", f"must be > 0 or null (train.lr), got {value}"
            )
        for name in ("image_layer_decay", "text_layer_decay"):
            value = getattr(self, name)
            _check(0 < value <= 1, f"train.{name}", f"must be in (0, 1] (1.0: off), got {value}")

    def _check_schedule(self) -> None:
        """The schedule keys: a known shape, and a cooldown that fits after the warmup."""
        _check(
            self.schedule in SCHEDULES,
            "train.schedule",
            f"must be one of {SCHEDULES}, got {self.schedule!r}",
        )
        _check(self.cooldown_steps >= 0, "train.cooldown_steps", f"must be >= 0, got {self.cooldown_steps}")
        _check(self.cooldown_power > 0, "train.cooldown_power", f"must be > 0, got {self.cooldown_power}")
        _check(
            self.cooldown_end_lr >= 0, "train.cooldown_end_lr", f"must be >= 0, got {self.cooldown_end_lr}"
        )
        if self.schedule != "const_cooldown":
            _check(
                self.cooldown_steps == 0,
                "train.cooldown_steps",
                f"only applies to train.schedule=const_cooldown (schedule is {self.schedule})",
            )
            return
        room = self.steps - self.warmup_steps
        _check(
            0 < self.cooldown_steps <= room,
            "train.cooldown_steps",
            f"must be in 1..{room} (train.steps - train.warmup_steps) with const_cooldown, got {self.cooldown_steps}",
        )
