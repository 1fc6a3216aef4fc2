"""The linear probe (CLIP paper A.3, clip_benchmark's `linear_probe` task): a linear classifier on frozen,
L2-normalised image features.

clip_benchmark's protocol: `torch.manual_seed(seed)` then `nn.Linear(dim, classes)`; AdamW, lr 0.1, cosine
schedule without warm-up, 10 epochs of batch 64, cross-entropy; weight decay 0 unless a validation split is
given, then its sweep: 97 values log-spaced in [1e-6, 1e2], 7 of them first, then the best narrowed by
spans 8, 4, 2, 1. Here the epochs run as steps of the shared loop (`epochs · ceil(N / batch)`); the sweep's
validation split is up to `val_per_class` training images per class that are not among the shots (clip_benchmark
takes a fraction of the train split before drawing shots).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pretrain.adapt import loop
from pretrain.adapt.data import AdaptRun, LabelledImages

HEAD_FILE = "linear_head.safetensors"
ADAPTER_FILE = "adapter.json"
WD_GRID = np.logspace(-6, 2, num=97).tolist()
WD_START = [
    round(i * 96 / 6) for i in range(7)
]  # the 7 log-spaced values of the grid clip_benchmark starts from


@dataclass
class LinearProbeConfig:
    """clip_benchmark's defaults (`--fewshot_lr`, `--fewshot_epochs`, `--batch_size`)."""

    lr: float = 0.1
    """AdamW learning rate."""
    epochs: int = 10
    """Passes over the shots."""
    batch_size: int = 64
    """Global batch."""
    weight_decay: float = 0.0
    """Used when `search_weight_decay` is off."""
    search_weight_decay: bool = False
    """clip_benchmark's sweep over weight decay on a validation split (below)."""
    val_per_class: int = 16
    """Validation images per class for the sweep: training images that are not shots."""
    checkpoint_every: int = 0
    """Resumable checkpoint every N steps (0: at the end only)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "val_per_class"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")


def loop_config(cfg: LinearProbeConfig, samples: int, weight_decay: float, seed: int) -> loop.LoopConfig:
    """The shared loop's settings for `epochs` passes over `samples` features."""
    steps = cfg.epochs * math.ceil(samples / min(cfg.batch_size, samples))
    return loop.LoopConfig(
        steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=weight_decay, optimizer="adamw",
        schedule="cosine", warmup=0, checkpoint_every=cfg.checkpoint_every, seed=seed,
    )  # fmt: skip


def train_head(
    features: torch.Tensor, labels: torch.Tensor, classes: int, cfg: loop.LoopConfig, output: Path | None
) -> torch.nn.Linear:
    """A linear head trained with cross-entropy on `features` (clip_benchmark's `train`)."""
    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(features.shape[1], classes)
    criterion = torch.nn.CrossEntropyLoss()

    def loss(model: torch.nn.Module, indices: torch.Tensor, _: torch.Generator) -> torch.Tensor:
        return criterion(model(features[indices]), labels[indices])

    loop.train(head, loss, len(features), cfg, output)
    return head


def accuracy(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (head(features).argmax(1) == labels).double().mean().item()


def search_weight_decay(
    run: AdaptRun, cfg: LinearProbeConfig, features: torch.Tensor, labels: torch.Tensor
) -> float:
    """clip_benchmark's sweep (`find_peak`): the weight decay of the best validation top-1."""
    val = validation_split(run.pool, run.train, cfg.val_per_class, run.seed)
    val_features, val_labels = run.features(val), torch.tensor(val.labels)
    scores: dict[int, float] = {}

    def peak(candidates: list[int]) -> int:
        for i in candidates:
            if i not in scores:
                sweep = loop_config(cfg, len(features), WD_GRID[i], run.seed)
                head = train_head(features, labels, len(run.classnames), sweep, None)
                scores[i] = accuracy(head, val_features, val_labels)
        return max(candidates, key=lambda i: (scores[i], -candidates.index(i)))

    best, span = peak(WD_START), 8
    while span > 0:
        best = peak([max(best - span, 0), best, min(best + span, len(WD_GRID) - 1)])
        span //= 2
    return WD_GRID[best]


def validation_split(
    pool: LabelledImages, shots: LabelledImages, per_class: int, seed: int
) -> LabelledImages:
    """Up to `per_class` images per class of `pool` that are not shots (seeded draw)."""
    taken = set(shots.keys)
    rng = np.random.default_rng([seed, 1])
    keep = [i for i in rng.permutation(len(pool.keys)).tolist() if pool.keys[i] not in taken]
    counts: dict[int, int] = {}
    chosen = []
    for i in keep:
        if counts.get(pool.labels[i], 0) < per_class:
            counts[pool.labels[i]] = counts.get(pool.labels[i], 0) + 1
            chosen.append(i)
    if not chosen:
        raise ValueError("search_weight_decay: every training image is a shot; no validation images are left")
    return pool.subset(sorted(chosen))


@dataclass
class LinearProbe:
    """A trained head over the frozen features of the checkpoint it came from."""

    head: torch.nn.Linear
    run: AdaptRun
    weight_decay: float

    @property
    def trainable_params(self) -> int:
        return loop.count_trainable(self.head)

    def logits(self, images: LabelledImages, classnames: Sequence[str]) -> torch.Tensor | None:
        if tuple(classnames) != self.run.classnames:
            return None  # the head knows only its training classes
        with torch.no_grad():
            return self.head(self.run.features(images))

    def save(self, folder: Path) -> None:
        """`linear_head.safetensors` (`weight` [classes, dim], `bias`) and `adapter.json` naming the method,
        the checkpoint the features come from, the classes and the weight decay used."""
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous() for name, p in self.head.state_dict().items()}
        save_file(tensors, str(folder / HEAD_FILE))
        info = {"method": "linear-probe", "checkpoint": self.run.checkpoint, "features": "encode_image, L2-normalised, eval transform",
                "classnames": list(self.run.classnames), "weight_decay": self.weight_decay}  # fmt: skip
        (folder / ADAPTER_FILE).write_text(json.dumps(info, indent=2) + "\n")


def fit(run: AdaptRun, cfg: LinearProbeConfig) -> LinearProbe:
    """Train the probe on the run's shots (clip_benchmark's `evaluate`, less the test pass)."""
    features, labels = run.features(run.train), torch.tensor(run.train.labels)
    weight_decay = (
        search_weight_decay(run, cfg, features, labels) if cfg.search_weight_decay else cfg.weight_decay
    )
    final = loop_config(cfg, len(features), weight_decay, run.seed)
    head = train_head(features, labels, len(run.classnames), final, run.output)
    return LinearProbe(head, run, weight_decay)
