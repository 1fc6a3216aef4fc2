"""Scoring an adapted model on eval sets and writing what `pretrain adapt` reports: one JSON line per eval set
(stdout and `results.jsonl`) and a markdown table (`results.md`).

Metrics are clip_benchmark's names: `top1`, `mean_per_class_recall` (the mean top-1 recall over the classes
that have images), `samples`. In a base-to-novel split each half is scored on its own classes only (CoOp's
protocol): `base_top1` with the base class names, `novel_top1` with the novel ones, and their harmonic mean.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from pretrain.adapt.data import LabelledImages, read_labels
from pretrain.adapt.fewshot import base_novel, restrict
from webshards.atomic import write_atomic
from webshards.evalset import read_eval_set

RESULTS_JSONL = "results.jsonl"
RESULTS_MD = "results.md"
COLUMNS = ("eval", "method", "shots", "top1", "base_top1", "novel_top1", "harmonic_mean", "train_seconds",
           "trainable_params")  # fmt: skip


def classification_metrics(logits: torch.Tensor, labels: Sequence[int]) -> dict:
    """`top1`, `mean_per_class_recall` and `samples` of class scores against labels."""
    target = torch.tensor(list(labels))
    hits = logits.argmax(1) == target
    recalls = [hits[target == c].double().mean().item() for c in target.unique().tolist()]
    return {"top1": hits.double().mean().item(), "mean_per_class_recall": sum(recalls) / len(recalls),
            "samples": len(target)}  # fmt: skip


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _score(adapted, images: LabelledImages, classnames: Sequence[str]) -> dict | None:
    logits = adapted.logits(images, classnames)
    return None if logits is None else classification_metrics(logits, images.labels)


def evaluate(adapted, root: str, base_to_novel: bool) -> dict:
    """The metrics of `adapted` on the `test` split of the eval set at `root`: `top1` etc. over all its classes,
    plus `base_top1`, `novel_top1`, `harmonic_mean` with `base_to_novel` (None where the method cannot score
    a set's classes). A method's class scores do not depend on the other classes scored with them, so each
    half is cut from the scores over all classes when the method has them (the test images are encoded once)."""
    eval_set = read_eval_set(root)
    classnames = list(eval_set.classnames)
    images = read_labels(root, "test")
    logits = adapted.logits(images, classnames)
    row = dict(classification_metrics(logits, images.labels)) if logits is not None else {"top1": None}
    row.setdefault("samples", len(images.keys))
    if base_to_novel:
        base, novel = base_novel(len(classnames))
        halves = {}
        for name, classes in (("base", base), ("novel", novel)):
            part = _half(adapted, images, logits, classes, classnames)
            halves[name] = part["top1"] if part else None
        row.update(base_top1=halves["base"], novel_top1=halves["novel"])
        row["harmonic_mean"] = harmonic_mean(halves["base"], halves["novel"])
    return row


def _half(adapted, images: LabelledImages, logits: torch.Tensor | None, classes, classnames) -> dict | None:
    """The metrics over `classes` only, on their images: cut from `logits` (all classes) when given, else
    scored by the method (a linear head or a class-specific context knows only some classes)."""
    part = restrict(images, classes)
    if logits is None:
        return _score(adapted, part, [classnames[c] for c in classes])
    rows = [i for i, label in enumerate(images.labels) if label in set(classes)]
    return classification_metrics(logits[rows][:, list(classes)], part.labels)


def eval_name(root: str) -> str:
    """An eval set's name in the results: its folder's name."""
    return Path(root.rstrip("/")).name or root


def write_results(folder: Path, rows: list[dict]) -> None:
    """`results.jsonl` (one object per eval set) and `results.md` (the table), both replaced."""
    folder = Path(folder)
    write_atomic(folder / RESULTS_JSONL, "".join(json.dumps(r) + "\n" for r in rows).encode())
    write_atomic(folder / RESULTS_MD, markdown_table(rows).encode())


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if value <= 1 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table of `COLUMNS` (those any row has)."""
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
