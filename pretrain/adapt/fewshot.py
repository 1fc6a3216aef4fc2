"""K-shot sampling and class splits: which training images a method sees, and which classes are base and
novel.

The draw depends only on the seed and the split's keys and labels (never on the rank count or read order):
per class, the keys sorted, then K of them chosen by `numpy.random.default_rng([seed, class])`. It is recorded
in the output folder (`shots.json`) so a run can be audited and repeated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pretrain.adapt.data import LabelledImages
from webshards.atomic import write_json_atomic

SHOTS_FILE = "shots.json"


def base_novel(classes: int) -> tuple[list[int], list[int]]:
    """Base-to-novel split (CoCoOp's `subsample_classes`): the first ceil(n/2) classes are base, the rest
    novel."""
    if classes < 2:
        raise ValueError(f"a base-to-novel split needs at least 2 classes, the set has {classes}")
    half = math.ceil(classes / 2)
    return list(range(half)), list(range(half, classes))


def restrict(images: LabelledImages, classes: Sequence[int]) -> LabelledImages:
    """The samples of `classes` only, their labels renumbered to positions in `classes`."""
    position = {c: i for i, c in enumerate(classes)}
    keep = [i for i, label in enumerate(images.labels) if label in position]
    chosen = images.subset(keep)
    labels = tuple(position[label] for label in chosen.labels)
    return LabelledImages(chosen.root, chosen.split, chosen.urls, chosen.keys, labels)


def sample_shots(images: LabelledImages, shots: int | None, classnames: Sequence[str], seed: int):
    """`shots` images per class (all of them when None), in class order then draw order. A class with fewer
    images than `shots` is a ValueError naming it and its count."""
    by_class: dict[int, list[int]] = {c: [] for c in range(len(classnames))}
    for i, label in enumerate(images.labels):
        if label not in by_class:
            raise ValueError(
                f"{images.root}/{images.split}: class index {label} outside its {len(classnames)} classes"
            )
        by_class[label].append(i)
    if shots is None:
        return images
    keep = []
    for label, members in by_class.items():
        if len(members) < shots:
            raise ValueError(
                f"--shots {shots}: class {classnames[label]!r} of {images.root}/{images.split} has only "
                f"{len(members)} images"
            )
        members.sort(key=lambda i: images.keys[i])
        chosen = np.random.default_rng([seed, label]).choice(len(members), shots, replace=False)
        keep.extend(members[j] for j in sorted(chosen.tolist()))
    return images.subset(keep)


def write_shots(
    folder: Path, images: LabelledImages, classnames: Sequence[str], shots: int | None, seed: int
):
    """`shots.json`: the seed, K, and the chosen keys per class name."""
    per_class: dict[str, list[str]] = {name: [] for name in classnames}
    for key, label in zip(images.keys, images.labels):
        per_class[classnames[label]].append(key)
    record = {"root": images.root, "split": images.split, "shots": shots, "seed": seed, "keys": per_class}
    write_json_atomic(Path(folder) / SHOTS_FILE, record)
