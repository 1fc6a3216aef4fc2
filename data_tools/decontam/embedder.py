"""Eval images embedded with the model that embedded the training data (semantic decontamination).

Embeddings of two models do not compare, so the model comes from the training embeddings folder's
``embed.json`` (written by ``data-tools embed``); a folder without one is refused unless ``--model``
names the model. Images go through the same decoding, transform and normalisation as ``embed``'s, so an
identical image gets the same embedding (to fp16 rounding).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from data_tools.embeddings import model_file, recorded_model
from webshards.outputs import Location
from webshards.samples import BadSample

log = logging.getLogger("data_tools")


@dataclass(frozen=True)
class EvalEmbedder:
    """The image tower of the training embeddings' model, applied to eval images (picklable: a pool
    worker loads the model itself, once)."""

    model: str
    pretrained: str | None = None
    device: str = "cpu"
    batch_size: int = 64

    def embed(self, images: Iterable[tuple[str, bytes]], part: str) -> tuple[list[str], np.ndarray]:
        """Keys and L2-normalised fp32 embeddings of the decodable ``images`` (the others are left out with
        a warning naming ``part``)."""
        import torch

        from data_tools import models
        from data_tools.embed import load_embedder

        bundle = load_embedder(self.model, self.pretrained, self.device)
        transform, normalize = models.split_transform(bundle.preprocess_val)
        size = models.image_size(bundle.model)
        keys, rows, images = [], [], iter(images)
        while batch := list(islice(images, self.batch_size)):
            tensors = []
            for key, data in batch:
                try:  # the key stands in for the caption decode_cpu insists on
                    tensors.append(models.decode_cpu({"jpg": data, "key": key}, transform, size, "key")[0])
                    keys.append(key)
                except BadSample as error:
                    log.warning("decontaminate: cannot decode %s in %s (%s), left out", key, part, error)
            if tensors:
                rows.append(self._encode(bundle.model, torch.stack(tensors), normalize))
        dim = int(getattr(bundle.model.visual, "output_dim", 0))
        return keys, np.concatenate(rows) if rows else np.zeros((0, dim), dtype=np.float32)

    def _encode(self, model, images, normalize) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            images = images.to(self.device)
            features = model.encode_image(normalize(images) if normalize else images)
        return F.normalize(features.float(), dim=-1).cpu().numpy()


def embedder_for(
    embeddings: Location, model: str | None, pretrained: str | None, device: str
) -> EvalEmbedder:
    """The embedder of the model recorded in ``embeddings`` (or ``model`` for a folder that records none);
    a ValueError when the model is unknown or ``model`` contradicts the record."""
    recorded = recorded_model(embeddings)
    if recorded is None and model is None:
        raise ValueError(
            f"{model_file(embeddings)} not found: which model made these embeddings is unknown "
            "(embed them again, or name it with --model)"
        )
    if recorded is not None:
        model = str(Path(model).resolve()) if model is not None and Path(model).exists() else model
        if model is not None and (model, pretrained) != (recorded["model"], recorded.get("pretrained")):
            raise ValueError(f"--model {model}: {embeddings} was embedded with {recorded['model']}")
        model, pretrained = recorded["model"], recorded.get("pretrained")
    from data_tools import models

    models.check_model(model, pretrained)
    return EvalEmbedder(model, pretrained, device)
