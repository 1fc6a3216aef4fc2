"""The reference for tests/pretrain/test_adapt_linear_probe.py: clip_benchmark's own linear probe
(`clip_benchmark.metrics.linear_probe.evaluate`) on features clip_benchmark's `Featurizer` computes with
open_clip's model and transform, for the images `pretrain adapt` chose (its shots.json).

Run in a subprocess with clip_benchmark on PYTHONPATH. clip_benchmark asserts CUDA and moves tensors with
`.cuda()` / `.to("cuda")`: on a CPU-only machine those are made no-ops below, which changes where, not what, it
computes (amp off). Prints clip_benchmark's result dict as a JSON line: without a validation split (weight
decay 0), then, with VAL_JSON (a list of train-split keys), with its weight-decay sweep on those images.

    python clip_benchmark_linear_probe.py EXPORT_DIR SET_ROOT SHOTS_JSON WORK_DIR [VAL_JSON]
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import open_clip
import torch
from clip_benchmark.metrics import linear_probe
from PIL import Image


def cpu_only() -> None:
    """`.cuda()` and `.to("cuda")` as no-ops (clip_benchmark's linear probe hard-codes CUDA)."""
    to = torch.Tensor.to
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.Tensor.to = lambda self, *a, **k: to(self, *("cpu" if x == "cuda" else x for x in a), **k)


def read_split(root: Path, split: str) -> dict[str, tuple[Image.Image, int]]:
    """Every sample of ROOT/split as key -> (image, class index), with tarfile and PIL alone."""
    samples: dict[str, dict] = {}
    count = int((root / split / "nshards.txt").read_text())
    for i in range(count):
        with tarfile.open(root / split / f"{i}.tar") as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {k: (Image.open(io.BytesIO(s["jpg"])).convert("RGB"), int(s["cls"])) for k, s in samples.items()}


def featurize(
    featurizer, preprocess, items: list[tuple[Image.Image, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        features = featurizer(torch.stack([preprocess(image) for image, _ in items]))
    return features, torch.tensor([label for _, label in items])


def main(export: str, root: str, shots_json: str, work: str, val_json: str | None = None) -> None:
    cpu_only()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    model.eval()
    featurizer = linear_probe.Featurizer(model, normalize=True)
    train, test = read_split(Path(root), "train"), read_split(Path(root), "test")
    shots = json.loads(Path(shots_json).read_text())
    feature_dir = Path(work) / "model"
    feature_dir.mkdir(parents=True)
    splits = {
        "train": [train[k] for keys in shots["keys"].values() for k in keys],
        "test": list(test.values()),
    }
    if val_json:
        splits["val"] = [train[k] for k in json.loads(Path(val_json).read_text())]
    for name, items in splits.items():  # where evaluate() caches features: it then reads them from here
        features, targets = featurize(featurizer, preprocess, items)
        torch.save(features, feature_dir / f"features_{name}.pt")
        torch.save(targets, feature_dir / f"targets_{name}.pt")
    for val in [None, []] if val_json else [None]:  # any val_dataloader but None: read features_val.pt
        result = linear_probe.evaluate(
            model, None, None, fewshot_k=shots["shots"], batch_size=64, num_workers=0, lr=0.1, epochs=10,
            model_id="model", seed=0, feature_root=work, device="cuda", val_dataloader=val, normalize=True,
            amp=False,
        )  # fmt: skip
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
