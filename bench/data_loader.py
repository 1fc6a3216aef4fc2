"""Data-loader benchmark: this project's WebDataset pipeline vs open_clip's `get_wds_dataset`, side by side.

Builds shards of photo-like JPEGs (512-1024 px), then measures samples/s of both loaders on the same
shards, with the same model transform (open_clip's train transform of `--model`) and the same number of
workers, and prints the ratio. open_clip's loader needs webdataset <= 0.2.86 (3.3 dies with KeyError
'fname' on 1.x), so it runs in a subprocess whose import path puts a private copy of webdataset 0.2.86
first (installed once with pip into bench/.cache); ours runs on the project's current webdataset.

    .venv/bin/python bench/data_loader.py                  # defaults: 2,000 images, workers 1 and 2
    .venv/bin/python bench/data_loader.py --workers 4 8 --images 8000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / "bench" / ".cache"
# open_clip_train's data module also imports pandas; its pure-Python dependencies come along, numpy is shared.
OPEN_CLIP_ENV = ["webdataset==0.2.86", "pandas", "python-dateutil", "pytz", "tzdata", "six"]


def photo(rng: np.random.Generator) -> bytes:
    """A photo-like JPEG: smooth colour fields plus fine texture, 512-1024 px, ~95 KiB at quality 90."""
    w, h = (int(v) for v in rng.integers(512, 1025, size=2))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) / max(w, h)
    base = [np.sin(xs * rng.uniform(2, 9) + ys * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)]
    pixels = (np.stack(base, -1) + 1) * 110 + rng.normal(0, 4, (h, w, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_shards(folder: Path, images: int, shards: int) -> str:
    """Write (once) `shards` shards holding `images` photos in all; returns the brace spec."""
    from data_tools.shards import ShardWriter, key_for, write_sizes

    spec = f"{folder}/{{00000..{shards - 1:05d}}}.tar"
    if (folder / "sizes.json").exists() and sum(
        json.loads((folder / "sizes.json").read_text()).values()
    ) == images:
        return spec
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_shard = -(-images // shards)
    for s in range(shards):
        with ShardWriter(folder, s) as writer:
            for i in range(min(per_shard, images - s * per_shard)):
                writer.add(
                    key_for(s, i), photo(rng), f"a photo number {i} of shard {s}", {"path": f"{s}/{i}"}
                )
    write_sizes(folder)
    return spec


def measure(batches, count: int, batch_size: int) -> float:
    """samples/s over `count` batches after 2 warm-up batches (worker start-up excluded)."""
    for _ in range(2):
        next(batches)
    start = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch_size / (time.perf_counter() - start)


def ours(spec: str, model: str, workers: int, decode: str, batch_size: int, count: int) -> float:
    import torch

    from pretrain.config import load_config
    from pretrain.data.loader import WebDatasetSource
    from pretrain.model import build_model

    cfg = load_config(None, [f"model.name={model}", f"data.workers={workers}", f"data.decode={decode}"])
    bundle = build_model(cfg.model)
    source = WebDatasetSource(spec, cfg.data, "resampled", 0, batch_size, 0, 1, bundle, torch.device("cpu"))
    # device-side resize/normalise runs on the GPU in training: time the workers only. The cpu path's
    # per-batch normalise stays in, run on this CPU: a conservative count.
    if decode != "cpu":
        source.finish = None

    def batches():
        while True:
            yield source.next_batch()

    try:
        return measure(batches(), count, batch_size)
    finally:
        source.close()


def old_webdataset() -> Path:
    target = CACHE / "open-clip-env"
    if not (target / "pandas").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *OPEN_CLIP_ENV],
                       check=True)  # fmt: skip
    return target


OPEN_CLIP_SNIPPET = """
import json, sys, time, argparse
import open_clip
from open_clip_train.data import get_wds_dataset
spec, model, workers, batch_size, count, samples = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
_, preprocess, _ = open_clip.create_model_and_transforms(model)
args = argparse.Namespace(train_data=spec, val_data=None, train_num_samples=samples, dataset_resampled=True,
    train_data_upsampling_factors=None, seed=0, workers=workers, batch_size=batch_size, world_size=1)
loader = get_wds_dataset(args, preprocess, True, tokenizer=open_clip.get_tokenizer(model)).dataloader
it = iter(loader)
for _ in range(2): next(it)
start = time.perf_counter()
for _ in range(count): next(it)
print(json.dumps({"samples_per_s": count * batch_size / (time.perf_counter() - start)}))
"""


def open_clip_loader(spec: str, model: str, workers: int, batch_size: int, count: int) -> float:
    env_path = f"{old_webdataset()}:{ROOT}"
    samples = batch_size * (count + 2) * 4
    proc = subprocess.run(
        [sys.executable, "-c", OPEN_CLIP_SNIPPET, spec, model, str(workers), str(batch_size), str(count), str(samples)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": env_path}, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"open_clip loader failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["samples_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=15, help="timed batches per measurement")
    parser.add_argument("--model", default="ViT-B-32", help="whose train transform both loaders apply")
    args = parser.parse_args()
    spec = build_shards(CACHE / f"photos-{args.images}", args.images, args.shards)
    print(f"shards: {spec} | model transform: {args.model} | batch {args.batch_size}")
    print(
        f"{'workers':>7} | {'open_clip':>10} | {'ours cpu':>10} | {'ratio':>5} | {'ours device':>11} | {'ratio':>5}"
    )
    for w in args.workers:
        base = open_clip_loader(spec, args.model, w, args.batch_size, args.batches)
        cpu = ours(spec, args.model, w, "cpu", args.batch_size, args.batches)
        dev = ours(spec, args.model, w, "device", args.batch_size, args.batches)
        print(
            f"{w:>7} | {base:>10.1f} | {cpu:>10.1f} | {cpu / base:>5.2f} | {dev:>11.1f} | {dev / base:>5.2f}"
        )
    print(
        "samples/s over the loader alone; 'device' times the workers only (resize/normalise run on the GPU)"
    )


if __name__ == "__main__":
    main()
