"""The eval side of decontamination: which images the eval sets hold, and their features (the index).

An eval set is an eval-set ROOT in clip_benchmark's layout (``webshards.evalset``: classification or
retrieval; local or a URL) or, more cheaply, a plain local folder of images (searched recursively). Its
*parts* are the set's shards, or the folder itself. One index task per part writes the features of its
images (``NNN-NNNNN.npz``: keys plus features); every match task then loads all parts into memory (eval
sets are small: ~1M images at most) once per process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from data_tools.dedup.exact import sample_digest
from data_tools.dedup.perceptual import phash64
from data_tools.inputs import IMAGE_EXTENSIONS
from data_tools.runner import Task
from webshards import evalset, outputs
from webshards.layout import iter_shard
from webshards.outputs import Location
from webshards.samples import image_extension
from webshards.urls import local_path, open_url

log = logging.getLogger("data_tools")

FOLDER = "folder"
"""The kind of an eval set given as a plain image folder (the others: ``webshards.evalset.TASKS``)."""


@dataclass(frozen=True)
class EvalSource:
    """One eval set: where it is, its kind, and its parts (shard URLs, or the folder itself)."""

    root: str
    kind: str
    parts: tuple[str, ...]


def open_eval_set(root: str, flag: str = "--eval-set") -> EvalSource:
    """Describe the eval set at ``root``; a ValueError names it (as given to ``flag``) when it is neither an
    eval set (no ``test/nshards.txt``) nor a local folder holding images."""
    folder = local_path(root)
    has_layout = evalset.read_text(evalset.join(root, evalset.SPLIT, evalset.NSHARDS_FILE)) is not None
    if folder is not None and Path(folder).is_dir() and not has_layout:
        if next(folder_images(Path(folder)), None) is None:
            raise ValueError(f"{flag} {root}: no eval set (test/nshards.txt) and no images in the folder")
        return EvalSource(root, FOLDER, (root,))
    try:
        found = evalset.read_eval_set(root)
    except FileNotFoundError as error:
        raise ValueError(f"{flag} {root}: {error}") from None
    return EvalSource(root, found.task, found.shards)


def folder_images(folder: Path) -> Iterator[Path]:
    """The image files under ``folder``, recursively, in sorted order (hidden files left out)."""
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file() and not path.name.startswith("."):
            yield path


def iter_images(part: str, kind: str) -> Iterator[tuple[str, bytes]]:
    """(key, encoded image) of every image of one part: the sample key in a shard, the path relative to
    the folder in a plain folder."""
    if kind == FOLDER:
        base = Path(local_path(part) or part)
        for path in folder_images(base):
            yield path.relative_to(base).as_posix(), path.read_bytes()
        return
    with open_url(part) as stream:
        for sample in iter_shard(stream, decode=False):
            ext = image_extension(sample)
            if ext is None:
                log.warning("decontaminate: %s in %s has no image, left out", sample["__key__"], part)
                continue
            yield sample["__key__"], sample[ext]


def image_of(part: str, kind: str, key: str) -> bytes | None:
    """The encoded image ``key`` of a part (for the example picture), or None when it is not there."""
    return next((data for k, data in iter_images(part, kind) if k == key), None)


def index_task(task: Task) -> int:
    """The runner task: the features of one part's images, ``keys`` and ``features`` in an ``.npz``."""
    part, kind, method, embedder = task.payload
    keys, features = [], []
    images = iter_images(part, kind)
    if method == "semantic":
        keys, features = embedder.embed(images, part)
    else:
        for key, data in images:
            feature = _hash(method, data, key, part)
            if feature is not None:
                keys.append(key)
                features.append(feature)
    with outputs.staged(task.output) as tmp, open(tmp, "wb") as f:
        np.savez(f, keys=np.array(keys, dtype=str), features=_stack(method, features))
    return len(keys)


def _hash(method: str, data: bytes, key: str, part: str) -> bytes | int | None:
    """dedup's feature of one image: sha256 of its bytes (exact) or its 64-bit pHash (perceptual)."""
    if method == "exact":
        return sample_digest(data)
    try:
        return phash64(data)
    except (OSError, SyntaxError, ValueError) as error:
        log.warning("decontaminate: cannot decode %s in %s (%s), left out", key, part, error)
        return None


def _stack(method: str, features: list) -> np.ndarray:
    if method == "exact":
        return np.frombuffer(b"".join(features), dtype=np.uint8).reshape(-1, 32)
    if method == "perceptual":
        return np.array(features, dtype=np.uint64)
    return np.asarray(features, dtype=np.float32)


@dataclass(frozen=True)
class EvalIndex:
    """Every eval image of the job, numbered in part order: its set, its part, its key and its feature."""

    set_id: np.ndarray
    part_id: np.ndarray
    keys: np.ndarray
    features: np.ndarray


@lru_cache(maxsize=1)
def load_index(files: tuple[Location, ...], set_ids: tuple[int, ...]) -> EvalIndex:
    """The index parts ``files`` (part ``j`` of set ``set_ids[j]``) as one index, loaded once per process."""
    loaded = [outputs.load_npy(f) for f in files]
    counts = [len(part["keys"]) for part in loaded]
    return EvalIndex(
        np.repeat(np.array(set_ids, dtype=np.int64), counts),
        np.repeat(np.arange(len(files)), counts),
        np.concatenate([part["keys"] for part in loaded]),
        np.concatenate([part["features"] for part in loaded]),
    )
