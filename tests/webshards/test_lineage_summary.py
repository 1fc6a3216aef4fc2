"""One line per stage: what the model card and `data-tools lineage` show of a chain, written out by hand here."""

from __future__ import annotations

from webshards.lineage_summary import summary_lines

# A decontamination stage as another stage might record it: eval sets as inputs, its own counts.
CHAIN = {
    "format": 1,
    "stage": {
        "id": "decontaminate-2",
        "name": "decontaminate",
        "parents": ["build-1"],
        "params": {"method": "perceptual", "threshold": 4, "workers": 8, "batch_size": 64},
        "inputs": [
            {"role": "shards", "location": "s3://b/shards/{00000..00009}.tar", "parents": ["build-1"]},
            {"role": "eval_set", "location": "s3://b/imagenet"},
            {"role": "eval_set", "location": "s3://b/coco"},
        ],
        "counts": {"samples_in": 1000, "samples_out": 990, "images_with_duplicates": 7, "pairs_removed": 10,
                   "per_eval_set": {"imagenet": 4, "coco": 6}},
    },
    "ancestors": {"build-1": {"id": "build-1", "name": "build", "parents": [], "params": {"image_size": 256},
                              "counts": {"samples_in": 1200, "samples_out": 1000, "failed": {}}}},
}  # fmt: skip


def test_each_stage_once_parents_first_with_its_deciding_settings_and_counts():
    assert summary_lines(CHAIN, markdown=False) == [
        "1. build: 1,200 -> 1,000 samples; image_size=256",
        "2. decontaminate: 1,000 -> 990 samples; method=perceptual, threshold=4; images_with_duplicates=7, "
        "pairs_removed=10, per_eval_set: imagenet 4, coco 6; eval sets `s3://b/imagenet`, `s3://b/coco`",
    ]
    assert summary_lines(CHAIN)[0].startswith("1. **build**: ")
