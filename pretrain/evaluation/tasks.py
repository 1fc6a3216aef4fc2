"""Running the configured evals: each eval set of `eval.tasks` by its task kind, and the validation loss on
`eval.val_data`. One result dict per eval, with the names clip_benchmark reports; the same dicts go to
`metrics.jsonl`, `eval_results.json` and `pretrain eval`'s output.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pretrain.config import EvalTaskConfig
from pretrain.evaluation.retrieval import run_retrieval
from pretrain.evaluation.val_loss import run_val_loss
from pretrain.evaluation.zeroshot import run_classification
from webshards.atomic import write_json_atomic
from webshards.evalset import CLASSIFICATION, read_eval_set

VAL_NAME = "val"
RESULTS_FILE = "eval_results.json"


def parse_task(text: str) -> EvalTaskConfig:
    """`NAME=ROOT` (the `--task` flag) as an eval task."""
    name, sep, root = text.partition("=")
    if not sep or not name or not root:
        raise ValueError(f"--task needs NAME=ROOT (e.g. imagenet=/data/imagenet1k), got {text!r}")
    return EvalTaskConfig(name=name, root=root)


def run_task(
    model, bundle, task: EvalTaskConfig, device: torch.device, batch_size: int, split: bool, workers: int = 0
) -> dict:
    """One eval set: `{"eval": name, "task": kind, <metrics>, "seconds"}`."""
    started = time.perf_counter()
    eval_set = read_eval_set(task.root, task.task)
    run = run_classification if eval_set.task == CLASSIFICATION else run_retrieval
    metrics = run(model, bundle, eval_set, device, batch_size, split, workers, task.name)
    return {"eval": task.name, "task": eval_set.task, **metrics, "seconds": time.perf_counter() - started}


def run_all(
    model, bundle, tasks: list[EvalTaskConfig], val_data: str | None, device: torch.device, batch_size: int,
    split: bool, workers: int = 0,
) -> list[dict]:  # fmt: skip
    """Every eval set in order, then the validation loss when `val_data` is set. The model is put in eval
    mode for the duration and back as it was."""
    was_training = model.training
    model.eval()
    try:
        results = [run_task(model, bundle, t, device, batch_size, split, workers) for t in tasks]
        if val_data:
            started = time.perf_counter()
            loss = run_val_loss(model, bundle, val_data, device, batch_size, split, workers, VAL_NAME)
            results.append({"eval": VAL_NAME, **loss, "seconds": time.perf_counter() - started})
    finally:
        model.train(was_training)
    return results


def write_results(run_dir: Path, step: int, results: list[dict]) -> Path:
    """`eval_results.json` in the run directory: the latest step's result of every eval (rank 0 calls this)."""
    path = Path(run_dir) / RESULTS_FILE
    write_json_atomic(path, [{"step": step, **r} for r in results])
    return path
