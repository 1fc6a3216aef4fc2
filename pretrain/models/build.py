"""Build open_clip models from open_clip names, the project's JSON configs, or a JSON file path."""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pretrain.config import ConfigError, ModelConfig, close_matches
from pretrain.models.checkpoint import load_trainer_state, resolve_checkpoint, verify_checkpoint
from pretrain.models.lock import apply_locks
from pretrain.parallel import load_model_weights

log = logging.getLogger("pretrain")

MODEL_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
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
    model_cfg: dict | None = None
    """open_clip's config of the model as built (`model.force_*` applied): what an export writes."""


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
    """Refuse a `model.pretrained` that is neither a local file or folder (a starting point, see
    `load_starting_point`) nor an open_clip tag of model `name`, before anything is built or downloaded,
    naming the tags open_clip knows for it."""
    if pretrained is None or name.startswith(SCHEMAS) or Path(pretrained).exists():
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


def build_tokenizer(name: str, context: int | None = None) -> Callable[..., torch.Tensor]:
    """open_clip's tokenizer for model `name`, of the config's context length or `context`.

    open_clip takes any bare name containing "siglip" whose config names no HF tokenizer for one of its
    T5 SigLIP tokenizers (which need `transformers` and a download). A config like `tiny-siglip` means
    open_clip's own BPE tokenizer, which is also what open_clip picks when it loads the export (`local-dir:`).
    """
    config = None if name.startswith(SCHEMAS) else open_clip.get_model_config(name)
    text_cfg = (config or {}).get("text_cfg", {})
    if "siglip" in name.lower() and config and not text_cfg.get("hf_tokenizer_name"):
        return open_clip.SimpleTokenizer(
            context_length=context or text_cfg.get("context_length", 77),
            **text_cfg.get("tokenizer_kwargs", {}),
        )
    return open_clip.get_tokenizer(name, context_length=context)


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", aug: dict | None = None) -> ModelBundle:
    """Create the model (fp32 weights; autocast handles bf16) with its tokenizer and transforms, load its
    starting weights (`model.pretrained`), then lock the towers `model.lock_*` asks for. `aug`: open_clip's
    `aug_cfg` for the training transform (`AugConfig.to_open_clip()`; None: open_clip's defaults)."""
    name = resolve_model_name(cfg.name)
    check_pretrained(name, cfg.pretrained)
    local = cfg.pretrained is not None and Path(cfg.pretrained).exists()
    tag = None if local else cfg.pretrained  # open_clip downloads tags; local starting points are read here
    try:
        model, preprocess_train, preprocess_val = _create(name, tag, device, cfg, aug)
    except (RuntimeError, OSError, pickle.UnpicklingError) as e:  # a failed download, a bad weights file
        if tag is None:
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"model.pretrained: cannot load {tag!r} for {name}: {reason}") from None
    if tag is None and not name.startswith(SCHEMAS):
        init_uninitialised(model)
    if local:
        load_starting_point(model, Path(cfg.pretrained), name)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters", name, n_params / 1e6)
    apply_locks(model, cfg)
    tokenizer = build_tokenizer(name, cfg.force_context_length)
    return ModelBundle(
        model, tokenizer, preprocess_train, preprocess_val, name, resolved_model_cfg(name, cfg)
    )


ARCH_KEYS = ("force_quick_gelu", "force_custom_text", "force_image_size", "force_context_length")
"""`model.*` keys that change the architecture open_clip builds."""
PREPROCESS_KEYS = ("image_mean", "image_std", "image_interpolation", "image_resize_mode")
"""`model.*` keys that change the model's preprocessing (its transforms and preprocess_cfg)."""


def build_overrides(cfg: ModelConfig) -> dict:
    """open_clip create_model_and_transforms' override arguments from `model.*` (a model rebuilt from a
    checkpoint needs them too)."""
    tuples = {k: tuple(v) for k in ("image_mean", "image_std") if (v := getattr(cfg, k)) is not None}
    return {**{k: getattr(cfg, k) for k in (*ARCH_KEYS, *PREPROCESS_KEYS)}, **tuples}


def model_config(name: str) -> dict | None:
    """The open_clip config dict of a resolved model name (`local-dir:` reads its export; None if unknown)."""
    if name.startswith("local-dir:"):
        path = Path(name.removeprefix("local-dir:")) / "open_clip_config.json"
        return json.loads(path.read_text()).get("model_cfg") if path.is_file() else None
    return open_clip.get_model_config(name)


def resolved_model_cfg(name: str, cfg: ModelConfig) -> dict | None:
    """open_clip's config of model `name` with `model.force_*` applied as create_model applies them: what an
    export writes, so that `local-dir:` builds the architecture that was trained. None for an unknown name."""
    model_cfg = model_config(name)  # a fresh copy; `local-dir:` reads its export's (overrides applied)
    if model_cfg is None:
        return None
    if cfg.force_quick_gelu:
        model_cfg["quick_gelu"] = True
    if cfg.force_custom_text:
        model_cfg["custom_text"] = True
    if cfg.force_image_size is not None:
        model_cfg["vision_cfg"]["image_size"] = cfg.force_image_size
    if cfg.force_context_length is not None:
        model_cfg["text_cfg"]["context_length"] = cfg.force_context_length
    return model_cfg


def saved_model_config(saved: dict) -> ModelConfig:
    """What rebuilds a checkpoint's model from its saved `model` section (older checkpoints lack the keys)."""
    return ModelConfig(
        name=saved["name"], **{k: saved[k] for k in (*ARCH_KEYS, *PREPROCESS_KEYS) if k in saved}
    )


def _create(name: str, tag: str | None, device, cfg: ModelConfig, aug: dict | None) -> tuple:
    """open_clip's model with its training and eval transforms, `model.*`'s overrides applied."""
    with warnings.catch_warnings():
        # open_clip's own transform takes only `scale` off the settings it reads, so it reports the jitter
        # and grayscale settings it applies as "unused"; AugConfig refuses those it would really leave unused
        warnings.filterwarnings("ignore", "Unused augmentation cfg items")
        return open_clip.create_model_and_transforms(
            name, pretrained=tag, device=device, **build_overrides(cfg),
            pretrained_image=cfg.pretrained_image and cfg.pretrained is None,  # weights given: no download
            force_patch_dropout=cfg.patch_dropout or None,  # FLIP; open_clip drops patches in training only
            aug_cfg=aug,
        )  # fmt: skip


def init_uninitialised(model: torch.nn.Module) -> None:
    """Initialise what open_clip leaves as `torch.empty` memory in a model built without weights: CoCa's
    decoder output projection (its `init_parameters` is never called and fails if called), which would
    otherwise start from whatever the allocator held, differently on each run."""
    decoder = getattr(model, "text_decoder", None)
    projection = getattr(decoder, "text_projection", None)
    if isinstance(projection, torch.nn.Parameter):
        with torch.no_grad():
            torch.nn.init.normal_(projection, std=projection.shape[0] ** -0.5)  # as for the text tower's


def context_length(model: torch.nn.Module) -> int:
    return int(getattr(model, "context_length", 77))


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def clamp_logit_scale(model: torch.nn.Module, max_scale: float = 100.0) -> None:
    """Keep the learnable temperature in [1, max_scale] (as CLIP does), after each optimizer step."""
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(max_scale))


def looks_like_path(spec: str | Path) -> bool:
    """Whether a model argument names a file or folder rather than an open_clip model: it has a path
    separator (and no schema such as `hf-hub:`) or starts with `.` or `~`."""
    text = str(spec)
    return not text.startswith(SCHEMAS) and ("/" in text or "\\" in text or text.startswith((".", "~")))


def load_trained(spec: str | Path, device: torch.device | str = "cpu") -> ModelBundle:
    """A model from an export folder, a checkpoint folder, a run directory, or an open_clip name; a path that
    is not there is a FileNotFoundError naming it (not an unknown model name), a checkpoint whose files
    differ from its manifest a `CheckpointError` (none of them read)."""
    path = Path(spec)
    if (path / "open_clip_config.json").is_file():
        return build_model(ModelConfig(name=f"local-dir:{path}"), device)
    if path.exists():
        folder = resolve_checkpoint(path)
        verify_checkpoint(folder)
        return load_checkpoint_model(folder, device)
    if looks_like_path(spec):
        raise FileNotFoundError(f"{spec}: no such checkpoint, run directory or export folder")
    return build_model(ModelConfig(name=str(spec)), device)


def load_checkpoint_model(folder: Path, device: torch.device | str = "cpu") -> ModelBundle:
    """The model of checkpoint `folder` (verified by the caller: `verify_checkpoint`), with its weights."""
    saved = load_trainer_state(folder)["config"]
    bundle = build_model(saved_model_config(saved["model"]), device)  # weights come from the checkpoint
    load_model_weights(folder, bundle.model)
    return bundle


def use_dict_outputs(model: torch.nn.Module) -> None:
    """Make `model(images, texts)` return a dict (open_clip's `output_dict`; CoCa always does), so callers
    read outputs by name: a CLIP forward returns 3 or 4 values, CoCa's a dict with logits and labels."""
    if hasattr(model, "output_dict"):
        model.output_dict = True


# ---- starting points (model.pretrained as a local file or folder) --------------------------------------
EXPORT_WEIGHTS = "open_clip_model.safetensors"
"""The weights file of an export folder (docs/export.md)."""
KEYS_SHOWN = 3


def load_starting_point(model: torch.nn.Module, path: Path, name: str) -> None:
    """Load the weights at `path` into `model`: a file through open_clip's `load_checkpoint` (an
    open_clip_train `epoch_N.pt` with its `state_dict` and `module.` prefixes, `.safetensors`, a state dict;
    `torch.load(weights_only=True)`, so no code runs), an export folder, or a checkpoint folder / run
    directory of ours (its model weights only: the run starts at step 0 with a fresh optimizer). Weights that
    do not fit the model are one `ConfigError` line naming the file and the first keys that differ."""
    try:
        if path.is_dir():
            incompatible = model.load_state_dict(_folder_weights(path, model), strict=False)
        else:
            incompatible = open_clip.load_checkpoint(model, str(path), strict=False, weights_only=True)
    except (pickle.UnpicklingError, SafetensorError) as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:  # weights_only refused a class: the file would run code if loaded in full
            raise ConfigError(
                f"model.pretrained: {path}: refusing to load it: unpickling it would call {found[1]}"
            ) from None
        raise ConfigError(
            f"model.pretrained: {path}: not a readable weights file ({_read_error(e)})"
        ) from None
    except RuntimeError as e:  # shapes that differ ("size mismatch for KEY: ..."), a file of another kind
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("size mismatch")), lines[0] if lines else "")
        raise ConfigError(f"model.pretrained: {path} does not fit {name}: {reason}") from None
    problems = [
        _first_keys(kind, keys) for kind, keys in
        (("missing keys", incompatible.missing_keys), ("unexpected keys", incompatible.unexpected_keys)) if keys
    ]  # fmt: skip
    if problems:
        raise ConfigError(f"model.pretrained: {path} does not fit {name}: {'; '.join(problems)}")
    log.info("model.pretrained: loaded %s", path)


def _read_error(e: Exception) -> str:
    """The informative line of a failed read (torch's weights_only message puts it after its preamble)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    after = [b for a, b in zip(lines, lines[1:]) if "WeightsUnpickler error" in a]
    return (after or lines)[0]


def _first_keys(kind: str, keys: list[str]) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > KEYS_SHOWN else ""
    return f"{kind} {', '.join(keys[:KEYS_SHOWN])}{more}"


def _folder_weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model weights of an export folder or of a checkpoint of ours (any strategy's format), shaped
    like `model`'s (a scalar logit scale saved as shape [1] by FSDP / DeepSpeed reads back as a scalar)."""
    if (path / EXPORT_WEIGHTS).is_file():
        state = load_file(str(path / EXPORT_WEIGHTS))
    else:
        try:
            folder = resolve_checkpoint(path)
        except FileNotFoundError:
            raise ConfigError(
                f"model.pretrained: {path} is neither an export folder ({EXPORT_WEIGHTS}) nor a checkpoint "
                "folder or run directory of ours (trainer.pt, checkpoints/latest)"
            ) from None
        state = load_trained(folder).model.state_dict()
    own = model.state_dict()
    scalar = {k for k, v in state.items() if k in own and v.numel() == 1 == own[k].numel()}
    return {k: v.reshape(own[k].shape) if k in scalar else v for k, v in state.items()}
