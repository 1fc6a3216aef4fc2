"""Data-loader benchmark: this project's WebDataset pipeline vs open_clip's `get_wds_dataset`, side by side.

Builds shards of photo-like JPEGs (512-1024 px), then measures samples/s of both loaders on the same
shards, with the same model transform (open_clip's train transform of `--model`) and the same number of
workers, and prints the ratio. open_clip's loader needs webdataset <= 0.2.86 (3.3 dies with KeyError
'fname' on 1.x), so it runs in a subprocess whose import path puts a private copy of webdataset 0.2.86
first (installed once with pip into bench/.cache); ours runs on the project's current webdataset.

    .venv/bin/python bench/data_loader.py                  # defaults: 2,000 images, workers 1 and 2
    .venv/bin/python bench/data_loader.py --workers 4 8 --images 8000
    .venv/bin/python bench/data_loader.py --small          # smoke run: 256 images, tiny-clip, 1 worker
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
    from webshards.layout import ShardWriter, key_for, read_sizes, write_sizes

    spec = f"{folder}/{{00000..{shards - 1:05d}}}.tar"
    if folder.is_dir() and sum(read_sizes(folder).values()) == images:
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


def ours(spec: str, model: str, workers: int, decode: str, batch_size: int, count: int, device: str) -> float:
    import torch

    from pretrain.config import load_config
    from pretrain.data.loader import WebDatasetSource
    from pretrain.models.build import build_model

    cfg = load_config(None, [f"model.name={model}", f"data.workers={workers}", f"data.decode={decode}"])
    bundle = build_model(cfg.model)
    source = WebDatasetSource(spec, cfg.data, "resampled", 0, batch_size, 0, 1, bundle, torch.device(device))
    # Without a GPU, device-side resize/normalise would run on this CPU: time the workers only. The cpu
    # path's per-batch normalise stays in, run on this CPU: a conservative count. On CUDA all of it runs.
    if decode != "cpu" and device == "cpu":
        source.finish = None
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def batches():
        while True:
            batch = source.next_batch()
            sync()
            yield batch

    try:
        return measure(batches(), count, batch_size)
    finally:
        source.close()


def old_webdataset() -> Path:
    """A folder holding webdataset 0.2.86 (and pandas & co. unless this Python has them), installed once.

    With BENCH_WHEELS set (a folder of wheels, for machines with no index: see bench/gpu.sh), pip installs
    from there only."""
    target = CACHE / "open-clip-env"
    if not (target / "webdataset").is_dir():
        have_pandas = (
            subprocess.run([sys.executable, "-c", "import pandas"], capture_output=True).returncode == 0
        )
        wanted = OPEN_CLIP_ENV[:1] if have_pandas else OPEN_CLIP_ENV
        offline = (
            ["--no-index", "--find-links", os.environ["BENCH_WHEELS"]] if "BENCH_WHEELS" in os.environ else []
        )
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *offline, "--target", str(target), *wanted],
                       check=True)  # fmt: skip
    return target


OPEN_CLIP_SNIPPET = """
import json, sys, time, argparse
import open_clip
from open_clip_train.data import get_wds_dataset
spec, model, workers, batch_size, count, samples = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
open_clip.add_model_config(sys.argv[7])  # configs/models/ (tiny-clip) for the small run
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
    env_path = ":".join(filter(None, [str(old_webdataset()), str(ROOT), os.environ.get("PYTHONPATH")]))
    samples = batch_size * (count + 2) * 4
    proc = subprocess.run(
        [sys.executable, "-c", OPEN_CLIP_SNIPPET, spec, model, str(workers), str(batch_size), str(count), str(samples),
         str(ROOT / "configs" / "models")],
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
    parser.add_argument(
        "--device", default="cpu", help="where our per-batch finishing runs (cuda: all of it)"
    )
    parser.add_argument(
        "--small", action="store_true", help="smoke run: the e2e.py --small shards, 2 batches"
    )
    args = parser.parse_args()
    if args.small:
        args.images, args.shards, args.workers, args.batch_size, args.batches = 256, 4, [1], 16, 2
        args.model = "tiny-clip"
    spec = build_shards(CACHE / f"photos-{args.images}-{args.shards}", args.images, args.shards)  # as e2e.py
    decodes = ["cpu", "device"] + (["nvjpeg"] if args.device.startswith("cuda") else [])
    print(f"shards: {spec} | model transform: {args.model} | batch {args.batch_size}")
    print(
        " | ".join(
            [f"{'workers':>7}", f"{'open_clip':>10}", *(f"{'ours ' + d:>11} | ratio" for d in decodes)]
        )
    )
    for w in args.workers:
        base = open_clip_loader(spec, args.model, w, args.batch_size, args.batches)
        cells = [f"{w:>7}", f"{base:>10.1f}"]
        for decode in decodes:
            rate = ours(spec, args.model, w, decode, args.batch_size, args.batches, args.device)
            cells.append(f"{rate:>11.1f} | {rate / base:>5.2f}")
        print(" | ".join(cells), flush=True)
    if args.device == "cpu":
        print(
            "samples/s over the loader alone, on the CPU ('device': the workers only, its finish is GPU work)"
        )
    else:
        print(f"samples/s over the loader alone, per-batch finishing on {args.device} included")


if __name__ == "__main__":
    main()
