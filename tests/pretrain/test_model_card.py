"""The export's model card: Hugging Face front matter (parsed by huggingface_hub), eval table, config."""

from __future__ import annotations

import json

import yaml
from helpers import ROOT, read_jsonl, train_in_process
from huggingface_hub import ModelCard, metadata_load

from pretrain.publish.export import export
from pretrain.publish.model_card import model_card

DATASETS = ["laion/laion400m", "mlfoundations/datacomp_small"]
# Eval lines as the trainer writes them: the demo's older zero-shot line and clip_benchmark-named lines.
EVALS = [
    {"step": 1, "eval": "zeroshot", "top1": 0.25, "top5": 0.5, "samples": 64},
    {"step": 2, "eval": "zeroshot", "top1": 0.375, "top5": 0.75, "samples": 64, "seconds": 0.8},
    {"step": 2, "eval": "imagenet", "task": "zeroshot_classification", "top1": 0.125, "top5": 0.5,
     "mean_per_class_recall": 0.0625, "samples": 50},
    {"step": 2, "eval": "demo-retrieval", "task": "zeroshot_retrieval", "image_retrieval_recall@1": 0.5,
     "image_retrieval_recall@5": 0.75, "image_retrieval_recall@10": 1.0, "text_retrieval_recall@1": 0.25,
     "text_retrieval_recall@5": 0.625, "text_retrieval_recall@10": 0.875, "samples": 64, "captions": 64,
     "seconds": 1.25},
    {"step": 3, "eval": "imagenet", "task": "zeroshot_classification", "top1": 0.9, "top5": 1.0},  # after the export
]  # fmt: skip
# What the card must report: the newest line of each eval set at the exported step 2, metrics only (no
# `seconds` of wall time, no `samples`/`captions` counts).
EXPECTED = {
    ("zeroshot", "zero-shot-image-classification"): {"top1": 0.375, "top5": 0.75},
    ("imagenet", "zero-shot-image-classification"): {
        "top1": 0.125,
        "top5": 0.5,
        "mean_per_class_recall": 0.0625,
    },
    ("demo-retrieval", "zero-shot-image-text-retrieval"): {
        k: v for k, v in EVALS[3].items() if "recall" in k
    },
}


def test_export_card_front_matter_parses_and_matches_the_runs_evals(tmp_path):
    overrides = [
        "train.steps=2",
        "train.batch_size=16",
        "run.license=apache-2.0",
        f"run.datasets=[{','.join(DATASETS)}]",
    ]
    run = train_in_process(tmp_path, overrides)
    with (run / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(line) + "\n" for line in EVALS)
    readme = export(run, tmp_path / "export") / "README.md"

    meta = metadata_load(readme)
    assert meta["library_name"] == "open_clip" and meta["pipeline_tag"] == "zero-shot-image-classification"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == DATASETS
    card = ModelCard.load(readme)  # huggingface_hub's parser: model-index -> EvalResult objects
    assert card.data.model_name == "tiny" and card.data.eval_results is not None
    got: dict = {}
    for r in card.data.eval_results:
        assert r.dataset_name == r.dataset_type
        got.setdefault((r.dataset_name, r.task_type), {})[r.metric_type] = r.metric_value
    assert got == EXPECTED

    text = readme.read_text()
    assert "| imagenet | zeroshot_classification | mean_per_class_recall | 0.0625 | 2 |" in text
    assert "| demo-retrieval | zeroshot_retrieval | text_retrieval_recall@5 | 0.6250 | 2 |" in text
    assert "| seconds |" not in text and "| captions |" not in text
    assert "samples seen: 32" in text  # 2 steps x 16 samples
    assert read_jsonl(run / "metrics.jsonl")[1]["samples_seen"] == 32
    config = json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])
    assert config == yaml.safe_load((run / "config.yaml").read_text())


def test_coca_card_names_image_to_text_and_leaves_unset_keys_out():
    model_cfg = json.loads((ROOT / "configs" / "models" / "tiny-coca.json").read_text())
    cfg = {"run": {"name": "coca-run", "license": None, "datasets": []}, "data": {"train": "synthetic"}}
    text = model_card("tiny-coca", model_cfg, cfg, [{"step": 5, "samples_seen": 80, "loss": 1.0}], 5, "ckpt")
    card = ModelCard(text)
    assert card.data.pipeline_tag == "zero-shot-image-classification"  # the Hub allows one pipeline tag
    assert "image-to-text" in card.data.tags and card.data.library_name == "open_clip"
    assert card.data.license is None and card.data.datasets is None and card.data.eval_results is None
    assert "A CoCa model" in text and "samples seen: 80" in text and "No evaluation results" in text
