"""Locked towers for continued pretraining: LiT (a whole tower frozen) and partial locking (the last layer
groups left trainable), with open_clip's meaning, by open_clip's own `lock_image_tower` / `lock_text_tower`.
CoCa has neither method; its towers' own `lock` is what those methods call for models with a separate text
tower, so CoCa is locked through them (its text decoder is never locked).

A locked parameter has `requires_grad=False`, so it gets no gradient, no optimizer state (pretrain/training/optim.py
leaves it out of the parameter groups) and no gradient communication: DDP builds its buckets from
parameters that require grad, FSDP2 reduce-scatters only gradients that exist, and DeepSpeed's ZeRO
partitions only the optimizer's parameters. Locking happens on the plain model, after the starting weights
are loaded and before a strategy wraps it.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator

from torch import nn

from pretrain.config import ConfigError, ModelConfig

log = logging.getLogger("pretrain")


def apply_locks(model: nn.Module, cfg: ModelConfig) -> None:
    """Lock the towers `cfg.lock_image` / `cfg.lock_text` ask for and log what stays trainable."""
    if not (cfg.lock_image or cfg.lock_text):
        return
    if cfg.lock_image:
        _lock_image(model, cfg)
    if cfg.lock_text:
        _lock_text(model, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    locked = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info("locked towers: %.2fM parameters trainable, %.2fM locked", trainable / 1e6, locked / 1e6)


def _lock_image(model: nn.Module, cfg: ModelConfig) -> None:
    groups, freeze_bn = cfg.lock_image_unlocked_groups, cfg.lock_image_freeze_bn_stats
    with _must_lock("model.lock_image_unlocked_groups", groups, "image", model):
        try:
            lock = getattr(model, "lock_image_tower", model.visual.lock)  # CoCa: its tower's own lock
            lock(unlocked_groups=groups, freeze_bn_stats=freeze_bn)
        except AssertionError as e:  # open_clip's ResNet tower: "partial locking not currently supported"
            tower = type(model.visual).__name__
            raise ConfigError(f"model.lock_image_unlocked_groups: {e} ({tower})") from None
    if freeze_bn and groups == 0:
        keep_in_eval(model.visual)


def _lock_text(model: nn.Module, cfg: ModelConfig) -> None:
    layers, freeze_ln = cfg.lock_text_unlocked_layers, cfg.lock_text_freeze_layer_norm
    if not freeze_ln and type(getattr(model, "text", None)).__name__ != "HFTextEncoder":
        raise ConfigError(
            "model.lock_text_freeze_layer_norm: false is supported by open_clip only for Hugging Face text "
            "towers; this model's text tower locks its LayerNorms with the rest (leave it true)"
        )
    with _must_lock("model.lock_text_unlocked_layers", layers, "text", model):
        lock = getattr(model, "lock_text_tower", None) or model.text.lock  # CoCa: its tower's own lock
        lock(unlocked_layers=layers, freeze_layer_norm=freeze_ln)


@contextlib.contextmanager
def _must_lock(key: str, unlocked: int, name: str, model: nn.Module) -> Iterator[None]:
    """Refuse a lock that freezes nothing: an unlocked count that covers every layer group of the tower."""
    before = sum(not p.requires_grad for p in model.parameters())
    yield
    if sum(not p.requires_grad for p in model.parameters()) == before:
        raise ConfigError(f"{key}: {unlocked} unlocks every layer group of the {name} tower; lock fewer")


def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """`train(mode)` of a frozen tower: always eval mode (norm statistics and dropout stay fixed)."""
    return nn.Module.train(self, False)


def keep_in_eval(module: nn.Module) -> None:
    """Keep `module` in eval mode whatever mode its parents are switched to (`model.train()`), as a fully
    locked tower whose BatchNorm statistics are frozen should be. A bound method, so deep copies keep it."""
    module.train = types.MethodType(_eval_only_train, module)
    module.eval()
