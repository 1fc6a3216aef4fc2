"""The one door from data_tools to the trainer's models: the only data_tools module that imports ``pretrain``.

Curation steps that need a CLIP model (embed; filter and semantic dedup read embed's output) reach it here,
so data_tools depends on ``pretrain`` in one place, and everything else in data_tools stands on
``webshards`` alone. What it offers: check a model name, load a model bundle (an open_clip name with a
pretrained tag, or anything ``pretrain`` trained or exported), the model's input size, its image transform
split for fast batches, and the decoding of a raw sample into (image tensor, caption).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pretrain.config import ModelConfig
from pretrain.data.decode import decode_cpu
from pretrain.data.transform import split_transform
from pretrain.models.build import (
    ModelBundle,
    build_model,
    image_size,
    load_trained,
    looks_like_path,
    resolve_model_name,
)

__all__ = ["check_model", "decode_cpu", "image_size", "load_model", "split_transform"]
log = logging.getLogger("data_tools")


def check_model(model: str, pretrained: str | None) -> None:
    """Fail early (without loading anything) on a path that is not there or an open_clip name neither
    open_clip nor configs/models knows; warn that a bare open_clip name without `pretrained` has random weights
    (its embeddings and CLIP scores mean nothing; fine for a test, not for curation)."""
    if pretrained is None and Path(model).exists():
        return  # a checkpoint, run directory or export folder: checked when it is loaded
    if pretrained is None and looks_like_path(model):
        raise ValueError(f"--model {model}: no such checkpoint, run directory or export folder")
    resolve_model_name(model)
    if pretrained is None and not model.startswith("hf-hub:"):
        log.warning(
            "warning: --model %s has no weights (no --pretrained tag, not a trained checkpoint or export): "
            "the embeddings and CLIP scores come from random weights",
            model,
        )


def load_model(model: str, pretrained: str | None, device: str) -> ModelBundle:
    """The model bundle in eval mode on ``device``: an open_clip name with its ``pretrained`` tag, else an
    export folder, checkpoint folder or run directory."""
    if pretrained is not None:
        bundle = build_model(ModelConfig(name=model, pretrained=pretrained), device)
    else:
        bundle = load_trained(model, device)
    bundle.model.to(device).eval()
    return bundle
