"""The optimizer's parameter groups: CLIP's weight-decay split, per-tower learning rates (`train.image_lr`,
`train.text_lr`) and layer-wise learning-rate decay (`train.image_layer_decay`, `train.text_layer_decay`).

Layers are numbered as EVA-CLIP's `--ld` (and timm's `param_groups_layer_decay` on a ViT) number them: a
tower of N transformer blocks has its embeddings at layer 0, block i at layer i + 1 and everything above the
blocks (final norm, attention pooler, projection) at the top, N + 1; a layer's rate is the tower's rate times
decay ** (top - layer). A timm image tower is numbered by its trunk's own `group_matcher` (timm's layer
decay), open_clip's projection head above it at the top. Parameters outside both towers (logit scale and
bias, CoCa's text decoder) keep `train.lr`.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Callable, Iterator

from open_clip import CLIP
from open_clip.transformer import TextTransformer, VisionTransformer
from timm.models import group_parameters
from torch import nn

from pretrain.config import ConfigError, TrainConfig

log = logging.getLogger("pretrain")

TOWERS = ("other", "image", "text")
"""Group order: `other` first, so the first group (whose rate metrics.jsonl logs as `lr`) follows `train.lr`."""
EMBEDDINGS = {
    "image": ("conv1", "class_embedding", "positional_embedding", "ln_pre"),
    "text": ("token_embedding", "positional_embedding", "cls_emb"),
}
"""Layer 0 of each tower: open_clip's names for what comes before the first block."""
CLIP_TEXT_PARTS = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
"""open_clip's CLIP keeps its text tower's parts on the model itself (no `text.` prefix)."""
BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.")


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Gains, biases, norms and the logit scale are not decayed (as in CLIP and open_clip)."""
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def tower_of(model: nn.Module, name: str) -> tuple[str, str]:
    """(`image`, `text` or `other`, the name inside that tower) of the parameter `name`."""
    if name.startswith("visual."):
        return "image", name.removeprefix("visual.")
    if name.startswith("text."):
        return "text", name.removeprefix("text.")
    if isinstance(model, CLIP) and name.split(".")[0] in CLIP_TEXT_PARTS:
        return "text", name
    return "other", name


def tower_module(model: nn.Module, tower: str) -> nn.Module:
    """The module holding `tower` (`image` or `text`): open_clip's CLIP keeps its text tower on itself."""
    return model.visual if tower == "image" else getattr(model, "text", model)


def tower_layers(model: nn.Module, tower: str) -> tuple[Callable[[str], int], int] | None:
    """(layer of a parameter by its name inside the tower, the top layer) for an open_clip ViT or text
    transformer, or a timm image tower (its trunk's `group_matcher`); None for a tower whose layers this
    project does not number (Hugging Face, ModifiedResNet)."""
    module = tower_module(model, tower)
    known = VisionTransformer if tower == "image" else (TextTransformer, CLIP)
    if isinstance(module, known):
        depth = len(module.transformer.resblocks)
        return (lambda inner: layer_id(tower, inner, depth)), depth + 1
    trunk = getattr(module, "trunk", None)
    if tower == "image" and callable(getattr(trunk, "group_matcher", None)):
        ids = group_parameters(trunk, trunk.group_matcher(coarse=False), reverse=True)  # {name: layer}
        top = max(ids.values()) + 1  # open_clip's head (pooler, projection) above the trunk
        return (lambda inner: ids.get(inner.removeprefix("trunk."), top)), top
    return None


def layer_id(tower: str, inner: str, depth: int) -> int:
    """EVA-CLIP's layer id of the parameter `inner` (its name inside `tower`) in a tower of `depth` blocks."""
    if inner.split(".")[0] in EMBEDDINGS[tower]:
        return 0
    block = BLOCK.match(inner)
    return int(block.group(1)) + 1 if block else depth + 1


class GroupPlan:
    """Which group each parameter joins and the group's base learning rate, from `train.*`."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.model, self.cfg = model, cfg
        self.tower_lr = {"other": cfg.lr, "image": cfg.image_lr or cfg.lr, "text": cfg.text_lr or cfg.lr}
        decays = {"image": cfg.image_layer_decay, "text": cfg.text_layer_decay}
        self.decay = {tower: d for tower, d in decays.items() if d != 1.0}
        # a tower gets groups of its own only when asked to: by default the two groups of CLIP and open_clip
        self.own = {"other"} | {t for t in ("image", "text") if getattr(cfg, f"{t}_lr") is not None}
        self.own |= set(self.decay)
        self.layers = {tower: self._layers(tower) for tower in self.decay}

    def _layers(self, tower: str) -> tuple[Callable[[str], int], int]:
        layers = tower_layers(self.model, tower)
        if layers is None:
            module = tower_module(self.model, tower)
            raise ConfigError(
                f"train.{tower}_layer_decay: this {tower} tower ({type(module).__name__}) has no layers this "
                "project can number (open_clip's ViT and text transformers, timm image towers); leave it 1.0"
            )
        return layers

    def key(self, name: str, param: nn.Parameter) -> tuple:
        """(tower, layer or -1, decayed): the same structure for any rates, so a resumed run may change them."""
        tower, inner = tower_of(self.model, name)
        if tower not in self.own:
            tower = "other"
        layer = self.layers[tower][0](inner) if tower in self.decay else -1
        excluded = any(fnmatch.fnmatchcase(name, pattern) for pattern in self.cfg.wd_exclude)
        return TOWERS.index(tower), layer, not (_no_decay(name, param) or excluded)

    def lr(self, key: tuple) -> float:
        tower, layer = TOWERS[key[0]], key[1]
        if tower not in self.decay:
            return self.tower_lr[tower]
        return self.tower_lr[tower] * self.decay[tower] ** (self.layers[tower][1] - layer)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The trainable parameters in groups of one weight decay and one base rate each; locked ones
    (requires_grad False) are in none, so the optimizer keeps no state for them. Without per-tower rates
    or layer decay these are today's two groups: undecayed, then decayed."""
    plan, grouped = GroupPlan(model, cfg), {}
    for name, param in _trainable(model):
        grouped.setdefault(plan.key(name, param), []).append(param)
    groups = [
        {"params": params, "weight_decay": cfg.weight_decay if key[2] else 0.0, "lr": plan.lr(key)}
        for key, params in sorted(grouped.items())
    ]
    if len(groups) > 2:
        rates = sorted({g["lr"] for g in groups})
        log.info("optimizer: %d parameter groups, base rates %.3g .. %.3g", len(groups), rates[0], rates[-1])
    return groups


def _trainable(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)
