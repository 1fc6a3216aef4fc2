"""Build open_clip models from open_clip names, the project's JSON configs, or a JSON file path."""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from pretrain.config import ConfigError, ModelConfig, close_matches

log = logging.getLogger("pretrain")

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
SCHEMAS = ("hf-hub:", "local-dir:")  # names that carry their own config and weights
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
MAX_TAGS_SHOWN = 6


class _QuietRandomInit(logging.Filter):
    """open_clip warns (on the root logger) whenever a model starts without pretrained weights: for
    pretraining from scratch that is the point, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


logging.getLogger().addFilter(_QuietRandomInit())


@dataclass
class ModelBundle:
    """A model with the tokenizer and image transforms open_clip pairs with it."""

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    preprocess_train: Callable[[Any], torch.Tensor]
    preprocess_val: Callable[[Any], torch.Tensor]
    name: str


_registered: set[Path] = set()


def register_model_configs(path: Path = MODEL_CONFIG_DIR) -> None:
    """Make JSON model configs (a file or a folder of them) known to open_clip by their file stem."""
    path = path.resolve()
    if path.exists() and path not in _registered:
        open_clip.add_model_config(path)
        _registered.add(path)


def resolve_model_name(name: str) -> str:
    """The open_clip name for `name`; a path to a JSON config is registered under its stem."""
    register_model_configs()
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"model.name: model config file not found: {path}")
        register_model_configs(path)
        return path.stem
    if name.startswith(SCHEMAS) or name in open_clip.list_models():
        return name
    hint = (
        close_matches(name, open_clip.list_models(), n=3)
        or " (see open_clip.list_models() and configs/models/)"
    )
    raise ConfigError(f"model.name: unknown model {name!r}{hint}")


def check_pretrained(name: str, pretrained: str | None) -> None:
    """Refuse a `model.pretrained` that is neither a weights file nor an open_clip tag of model `name`,
    before anything is built or downloaded, naming the tags open_clip knows for it."""
    if pretrained is None or name.startswith(SCHEMAS) or Path(pretrained).is_file():
        return
    if open_clip.is_pretrained_cfg(name, pretrained):
        return
    looks_like_path = any(c in pretrained for c in "/\\") or Path(pretrained).suffix in WEIGHT_SUFFIXES
    if looks_like_path:
        raise ConfigError(f"model.pretrained: weights file not found: {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tags:
        known = f"open_clip has no pretrained tags for {name} (give a weights file)"
    else:
        more = f", ... ({len(tags)} in all)" if len(tags) > MAX_TAGS_SHOWN else ""
        known = f"open_clip's tags for {name}: {', '.join(tags[:MAX_TAGS_SHOWN])}{more}"
    hint = close_matches(pretrained, tags)
    raise ConfigError(f"model.pretrained: unknown tag {pretrained!r} for {name}{hint}; {known}")


def _init_caption_projection(model: torch.nn.Module) -> None:
    """open_clip's CoCa leaves its text decoder's output projection as `torch.empty` (the decoder's
    `init_parameters` is never called; open_clip PR #551): it starts as whatever that memory held, zeros or
    garbage, different per process. Give it the init that method meant: normal, std width**-0.5."""
    projection = getattr(getattr(model, "text_decoder", None), "text_projection", None)
    if isinstance(projection, torch.nn.Parameter):
        with torch.no_grad():
            torch.nn.init.normal_(projection, std=projection.shape[0] ** -0.5)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> ModelBundle:
    """Create the model (fp32 weights; autocast handles bf16) with its tokenizer and transforms."""
    name = resolve_model_name(cfg.name)
    check_pretrained(name, cfg.pretrained)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=cfg.pretrained, device=device
        )
    except (RuntimeError, OSError, pickle.UnpicklingError) as e:  # a failed download, a bad weights file
        if cfg.pretrained is None:
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model.pretrained: cannot load {cfg.pretrained!r} for {name}: {reason}") from None
    if cfg.pretrained is None and not name.startswith(SCHEMAS):  # weights that were loaded stay
        _init_caption_projection(model)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters", name, n_params / 1e6)
    return ModelBundle(model, open_clip.get_tokenizer(name), preprocess_train, preprocess_val, name)


def context_length(model: torch.nn.Module) -> int:
    return int(getattr(model, "context_length", 77))


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def clamp_logit_scale(model: torch.nn.Module, max_scale: float = 100.0) -> None:
    """Keep the learnable temperature in [1, max_scale] (as CLIP does), after each optimizer step."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(max_scale))


def load_trained(spec: str | Path, device: torch.device | str = "cpu") -> ModelBundle:
    """A model from an export folder, a checkpoint folder, a run directory, or an open_clip name."""
    from pretrain.checkpoint import load_trainer_state, resolve_checkpoint
    from pretrain.parallel import load_model_weights

    path = Path(spec)
    if (path / "open_clip_config.json").is_file():
        return build_model(ModelConfig(name=f"local-dir:{path}"), device)
    if path.exists():
        folder = resolve_checkpoint(path)
        saved = load_trainer_state(folder)["config"]
        bundle = build_model(
            ModelConfig(name=saved["model"]["name"]), device
        )  # weights come from the checkpoint
        load_model_weights(folder, bundle.model)
        return bundle
    return build_model(ModelConfig(name=str(spec)), device)
