"""The adaptation methods by name: one `MethodSpec` each (what it trains, its config dataclass, its `fit`).
Adding a method is one entry in `METHODS`; a name whose spec has no `fit` yet is refused with one line."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from pretrain.config_sections import close_matches

if TYPE_CHECKING:  # the methods' modules import torch and open_clip: loaded when a method is used
    import torch

    from pretrain.adapt.data import AdaptRun, LabelledImages


class Adapted(Protocol):
    """An adapted model, as `fit` returns it."""

    trainable_params: int
    """How many parameters the method trained."""

    def logits(self, images: LabelledImages, classnames: Sequence[str]) -> torch.Tensor | None:
        """Class scores of `images` over `classnames` (rows in `images.keys` order); None when the method
        cannot score these classes (a linear head knows only the classes it was trained on)."""

    def save(self, folder: Path) -> None:
        """Write what `pretrain eval` or open_clip can load (or what reproduces the model) into `folder`."""


@dataclass(frozen=True)
class MethodSpec:
    """One adaptation method. Its config and `fit` are named as `module:attribute` and imported when used, so
    that `pretrain --help` and the method list need neither torch nor open_clip."""

    name: str
    trains: str
    """What it trains, in words (`pretrain adapt --help`)."""
    config_ref: str | None
    """Its hyper-parameters: a dataclass, the paper's defaults, validated in `__post_init__`."""
    fit_ref: str | None
    """Train on the run's shots (`fit(run, cfg) -> Adapted`); None while the method is not built."""

    @property
    def config(self) -> type | None:
        return _load(self.config_ref)

    @property
    def fit(self) -> Callable[[AdaptRun, Any], Adapted] | None:
        return _load(self.fit_ref)


def _load(ref: str | None) -> Any:
    """The object a `module:attribute` reference names (None stays None)."""
    if ref is None:
        return None
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


METHODS: dict[str, MethodSpec] = {
    "linear-probe": MethodSpec(
        "linear-probe", "a linear classifier on frozen, normalised image features (CLIP paper, clip_benchmark)",
        "pretrain.adapt.linear_probe:LinearProbeConfig", "pretrain.adapt.linear_probe:fit",
    ),
    "coop": MethodSpec(
        "coop", "learnable prompt context vectors, CLIP frozen (CoOp)",
        "pretrain.adapt.coop:CoOpConfig", "pretrain.adapt.prompt_methods:fit_coop",
    ),
    "pre": MethodSpec(
        "pre", "CoOp's prompts through a small prompt encoder (PRE)",
        "pretrain.adapt.pre:PREConfig", "pretrain.adapt.prompt_methods:fit_pre",
    ),
    "lora": MethodSpec(
        "lora", "low-rank adapters on q, k, v of both towers, trained end to end (CLIP-LoRA)",
        "pretrain.adapt.lora_methods:LoRAMethodConfig", "pretrain.adapt.lora_methods:fit",
    ),
    "glad": MethodSpec(
        "glad", "LoRA with GLAD's gradient-based regulariser",
        "pretrain.adapt.lora_methods:GLADMethodConfig", "pretrain.adapt.lora_methods:fit_glad",
    ),
}  # fmt: skip


def method(name: str) -> MethodSpec:
    """The spec of `name`; a ValueError when unknown or not built yet."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}{close_matches(name, list(METHODS))}")
    spec = METHODS[name]
    if spec.fit is None or spec.config is None:
        raise ValueError(f"method {name!r} is not available yet (available: {', '.join(available())})")
    return spec


def available() -> list[str]:
    return [name for name, spec in METHODS.items() if spec.fit is not None]


def build_config(spec: MethodSpec, overrides: Sequence[str]) -> Any:
    """The method's config with `key=value` overrides (values parsed as YAML scalars); an unknown key or a bad
    value is a ValueError naming it."""
    known = {f.name: f for f in fields(spec.config)}
    values: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"config override must be key=value, got {item!r}")
        if key not in known:
            hint = close_matches(key, list(known)) or f" (keys: {', '.join(known)})"
            raise ValueError(f"unknown config key {key!r} for method {spec.name}{hint}")
        values[key] = _typed(key, yaml.safe_load(text), getattr(spec.config(), key))
    return spec.config(**values)


def _typed(key: str, value: Any, default: Any) -> Any:
    """`value` as the type of the field's default (an int where a float is expected is fine)."""
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if isinstance(default, str) and value is None:
        value = ""  # `key=` (an empty YAML scalar) sets an empty string
    if isinstance(default, tuple) and isinstance(value, (list, str)):  # targets=[q,v] or targets=q,v
        value = tuple(value) if isinstance(value, list) else tuple(v.strip() for v in value.split(","))
    if default is not None and type(value) is not type(default):
        raise ValueError(f"config key {key}: expected {type(default).__name__}, got {value!r}")
    return value
