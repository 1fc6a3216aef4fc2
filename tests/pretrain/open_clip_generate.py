"""Run open_clip's own `CoCa.generate` on an export: the outside reference for `pretrain caption`.

Imports nothing of this project. Usage: python open_clip_generate.py EXPORT_DIR SETTINGS_JSON IMAGE...
where SETTINGS_JSON is a list of {"seed": N, "kwargs": {...generate keyword arguments...}}. Prints one JSON
object: for each setting, the token rows and the captions as open_clip's README decodes them.
"""

import json
import sys

import open_clip
import torch
from PIL import Image


def main() -> None:
    export, settings, paths = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    model.eval()
    images = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])
    results = []
    for setting in settings:
        torch.manual_seed(setting["seed"])
        with torch.no_grad():
            rows = model.generate(images, **setting["kwargs"])
        captions = [
            open_clip.decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "").strip()
            for row in rows
        ]
        results.append({"tokens": rows.tolist(), "captions": captions})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
