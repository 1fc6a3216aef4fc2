"""clip_benchmark's zero-shot classification and retrieval for one trained model, as its `clip_benchmark eval`
runs them on a `wds/` dataset: `load_open_clip`, `build_dataset`, a DataLoader over `dataset.batched(...)`, and
`zeroshot_classification.evaluate` / `zeroshot_retrieval.evaluate` (amp off: the runs are fp32 on CPU).
Not its CLI itself: clip_benchmark.cli imports its captioning metric, which needs pycocoevalcap and a Java
runtime that these two tasks never use.

Run by bench/parity.py in a subprocess with clip_benchmark's private site first on PYTHONPATH. Each MODEL is an
open_clip name (with PRETRAINED an open_clip_train checkpoint) or `local-dir:EXPORT` (with PRETRAINED empty);
MODELS_DIR holds the configs/models JSONs (tiny-clip, ...). Prints one JSON line per model, in order.

    python bench/parity_score.py MODELS_DIR CLASSIFICATION_ROOT RETRIEVAL_ROOT MODEL PRETRAINED [MODEL PRETRAINED ...]
"""

from __future__ import annotations

import json
import sys

import open_clip
import torch
from clip_benchmark.datasets.builder import build_dataset
from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
from clip_benchmark.models import load_clip

BATCH = 64


def loader(task: str, root: str, transform) -> tuple:
    """clip_benchmark's dataset for the `wds/` set at ROOT and its DataLoader, as its CLI builds them."""
    dataset = build_dataset(
        dataset_name=f"wds/{task}", root=root, transform=transform, split="test", download=True, task=task
    )
    data = torch.utils.data.DataLoader(dataset.batched(BATCH), batch_size=None, shuffle=False, num_workers=0)
    return dataset, data


def score(model_name: str, pretrained: str, classification: str, retrieval: str) -> dict:
    """Zero-shot top-1 (acc1, acc5, mean_per_class_recall) and recall@5 both ways of one model."""
    model, transform, tokenizer = load_clip(
        model_type="open_clip",
        model_name=model_name,
        pretrained=pretrained or None,
        cache_dir=None,
        device="cpu",
    )
    model.eval()
    dataset, data = loader("zeroshot_classification", classification, transform)
    scores = zeroshot_classification.evaluate(
        model, data, tokenizer, dataset.classes, dataset.templates, device="cpu", amp=False
    )
    _, data = loader("zeroshot_retrieval", retrieval, transform)
    scores.update(
        zeroshot_retrieval.evaluate(model, data, tokenizer, device="cpu", amp=False, recall_k_list=[5])
    )
    return scores


def main(models_dir: str, classification: str, retrieval: str, *models: str) -> None:
    open_clip.add_model_config(models_dir)
    for model_name, pretrained in zip(models[::2], models[1::2], strict=True):
        print(json.dumps(score(model_name, pretrained, classification, retrieval)), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
