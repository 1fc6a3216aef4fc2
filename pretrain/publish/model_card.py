"""The export's model card (README.md): Hugging Face front matter, eval results as a `model-index`, config.

The front matter follows the Hub's model card metadata: `library_name: open_clip`, one `pipeline_tag`
(the Hub allows one; CoCa's second task, image-to-text, goes in `tags`), `license` and `datasets` from the
run config (`run.license`, `run.datasets`), and `model-index` built from the run's `eval` lines in
metrics.jsonl. Eval lines are read generically: the task kind is the line's `task` key when present
(`zeroshot_classification` / `zeroshot_retrieval`), else inferred from its metric names, so lines written
before the clip_benchmark names (`{"eval": "zeroshot", "top1", "top5"}`) still make a card.
"""

from __future__ import annotations

import json

import yaml

from pretrain.publish.data_card import training_data_section
from pretrain.training.metrics import EVAL_NOT_METRICS

# Eval task kind -> (model-index task type, human name). The Hub has no pipeline tag for image-text
# retrieval, so retrieval uses a descriptive type of its own.
TASKS = {
    "zeroshot_classification": ("zero-shot-image-classification", "Zero-shot image classification"),
    "zeroshot_retrieval": ("zero-shot-image-text-retrieval", "Zero-shot image-text retrieval"),
}


def eval_metrics(line: dict) -> dict[str, float]:
    """The metrics of one eval line: its numeric values, bookkeeping, counts and wall time left out."""
    return {
        k: v
        for k, v in line.items()
        if k not in EVAL_NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def eval_task(line: dict) -> str:
    """The line's task kind: its `task` key, else `zeroshot_retrieval` when it has recall metrics."""
    if line.get("task"):
        return str(line["task"])
    return "zeroshot_retrieval" if any("recall@" in k for k in line) else "zeroshot_classification"


def latest_evals(rows: list[dict], step: int) -> list[dict]:
    """The newest eval line of each eval set at or before `step`, in order of first appearance."""
    latest: dict[str, dict] = {}
    for row in rows:
        if "eval" in row and row.get("step", 0) <= step:
            latest[str(row["eval"])] = row
    return list(latest.values())


def samples_seen(rows: list[dict], step: int) -> int | None:
    """`samples_seen` of the last training line at or before `step` (None when no line has it)."""
    seen = [r["samples_seen"] for r in rows if "eval" not in r and "samples_seen" in r and r["step"] <= step]
    return seen[-1] if seen else None


def model_index(name: str, evals: list[dict]) -> list[dict]:
    """The Hub's `model-index` schema: one result per eval set, its metrics as `{type, value}`."""
    results = []
    for line in evals:
        kind = eval_task(line)
        task_type, task_name = TASKS.get(kind, (kind.replace("_", "-"), kind))
        results.append(
            {
                "task": {"type": task_type, "name": task_name},
                "dataset": {"name": str(line["eval"]), "type": str(line["eval"])},
                "metrics": [{"type": k, "value": v, "name": k} for k, v in eval_metrics(line).items()],
            }
        )
    return [{"name": name, "results": results}] if results else []


def front_matter(name: str, model_cfg: dict, run_cfg: dict, evals: list[dict]) -> dict:
    """The card's YAML metadata (keys the Hub reads); absent values are left out, not written empty."""
    coca = "multimodal_cfg" in model_cfg
    meta: dict = {
        "library_name": "open_clip",
        "pipeline_tag": "zero-shot-image-classification",
        "tags": ["clip", "open_clip", *(["coca", "image-to-text"] if coca else [])],
    }
    if run_cfg.get("license"):
        meta["license"] = run_cfg["license"]
    if run_cfg.get("datasets"):
        meta["datasets"] = list(run_cfg["datasets"])
    index = model_index(name, evals)
    if index:
        meta["model-index"] = index
    return meta


def eval_table(evals: list[dict]) -> str:
    """A markdown table, one row per (eval set, metric), or a sentence when nothing was evaluated."""
    if not evals:
        return "No evaluation results were recorded for this run."
    rows = ["| eval set | task | metric | value | step |", "|---|---|---|---|---|"]
    for line in evals:
        for metric, value in eval_metrics(line).items():
            rows.append(f"| {line['eval']} | {eval_task(line)} | {metric} | {value:.4f} | {line['step']} |")
    return "\n".join(rows)


def model_card(
    name: str, model_cfg: dict, cfg: dict, rows: list[dict], step: int, source: str, data: dict | None = None
) -> str:
    """README.md of an export: front matter, usage, data, samples seen, training data, eval table, config.

    `name` is the open_clip architecture, `cfg` the run's (redacted) config, `rows` its metrics.jsonl
    lines, `step` the exported checkpoint's step, `source` the checkpoint it came from and `data` the run's
    data card (`data_card.json`; None: the section says the curation is not recorded).
    """
    evals = latest_evals(rows, step)
    run_cfg = cfg.get("run", {})
    meta = front_matter(run_cfg.get("name", name), model_cfg, run_cfg, evals)
    seen = samples_seen(rows, step)
    kind = "CoCa" if "multimodal_cfg" in model_cfg else "CLIP"
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).rstrip()}
---
# {run_cfg.get("name", name)}

A {kind} model trained with this project's `pretrain` trainer (open_clip architecture `{name}`).

## Use
```python
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:PATH_TO_THIS_FOLDER")
tokenizer = open_clip.get_tokenizer("local-dir:PATH_TO_THIS_FOLDER")
```

## Training
- data: `{cfg.get("data", {}).get("train", "unknown")}`
- steps: {step}
- samples seen: {seen if seen is not None else "unknown"}

## Training data
{training_data_section(data)}

## Evaluation
{eval_table(evals)}

## Training config
Exported from `{source}` (step {step}).
```json
{json.dumps(cfg, indent=2)}
```
"""
