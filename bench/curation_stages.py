"""Samples/s of issue 24's curation stages end to end, one worker each, on one synthetic pool: DataComp's
basic + text-based filter on the shards alone, MetaCLIP matching and balancing, eval-set decontamination
(exact, perceptual), and the image-based filter's assignment of rows to their nearest centroid.

    .venv/bin/python bench/curation_stages.py                  # 100,000 samples
    .venv/bin/python bench/curation_stages.py --samples 20000 --entries 50000

The pool: shards of 10,000 samples, 32 px JPEGs (2% byte copies, 2% re-encoded copies, as
bench/data_tools.py), alt-text-like captions (bench/text_filters.py: 3-20 words, a third holding an
ImageNet class name, a tenth in another language), sizes in KEY.json drawn so the preset's size rules
bite. MetaCLIP's entries are the caption words and class names plus ``--entries`` random pseudo-words (the
paper's list has 500,000). The eval set for decontamination is 1,000 images, 50 of them copies of pool
images. Each stage runs through ``data_tools.cli.main`` in this process with ``--workers 1``; the printed
rate divides the pool's samples by the whole job's seconds (reading the shards included).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

from text_filters import WORDS, captions  # noqa: E402

from data_tools.cli import main as data_tools  # noqa: E402
from data_tools.image_filter import nearest_centroid  # noqa: E402
from webshards.layout import ShardWriter, iter_shard, key_for  # noqa: E402

SHARD_ITEMS = 10000
EVAL_IMAGES, EVAL_COPIES = 1000, 50


def load_data_tools_bench():
    """bench/data_tools.py (its name is the package's, so it is loaded by path): its JPEG maker."""
    spec = importlib.util.spec_from_file_location("bench_data_tools", BENCH / "data_tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_pool(folder: Path, samples: int) -> str:
    """The pool's shards (see the module docstring); returns their brace spec."""
    rng = np.random.default_rng(0)
    jpeg = load_data_tools_bench().jpeg_bytes
    texts = captions(samples)
    made: list[bytes] = []
    shards = -(-samples // SHARD_ITEMS)
    for shard in range(shards):
        with ShardWriter(folder, shard) as writer:
            for i in range(min(SHARD_ITEMS, samples - shard * SHARD_ITEMS)):
                roll = rng.random()
                data = made[int(rng.integers(len(made)))] if made and roll < 0.02 else jpeg(rng)
                if made and 0.02 <= roll < 0.04:
                    data = reencoded(made[int(rng.integers(len(made)))])
                made.append(data)
                width, height = (int(v) for v in rng.integers(100, 1200, 2))
                meta = {"path": f"{shard}/{i}", "original_width": width, "original_height": height}
                writer.add(key_for(shard, i, 5), data, texts[shard * SHARD_ITEMS + i], meta)
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


def reencoded(data: bytes) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, format="JPEG", quality=70)
    return out.getvalue()


def write_eval_folder(folder: Path, pool: Path) -> None:
    """EVAL_IMAGES images: EVAL_COPIES copies of the first pool images, the rest new."""
    rng = np.random.default_rng(1)
    jpeg = load_data_tools_bench().jpeg_bytes
    folder.mkdir()
    for sample, i in zip(iter_shard(pool / "00000.tar", decode=False), range(EVAL_COPIES)):
        (folder / f"copy{i:04d}.jpg").write_bytes(sample["jpg"])
    for i in range(EVAL_COPIES, EVAL_IMAGES):
        (folder / f"new{i:04d}.jpg").write_bytes(jpeg(rng))


def write_entries(path: Path, random_entries: int) -> None:
    """Caption words and ImageNet class names plus ``random_entries`` pseudo-words, one per line."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    rng = np.random.default_rng(2)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    made = {"".join(rng.choice(letters, int(rng.integers(4, 12)))) for _ in range(random_entries)}
    path.write_text("\n".join([*WORDS, *IMAGENET_CLASSNAMES, *sorted(made)]) + "\n")


def timed(name: str, argv: list[str], samples: int) -> None:
    """Run one data-tools job and print its rate over the pool."""
    start = time.perf_counter()
    status = data_tools([*argv, "--workers", "1"])
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{name}: data-tools exited {status}")
    print(f"RATE {name}: {samples / seconds:,.0f} samples/s ({seconds:.1f} s)", flush=True)


def assignment_rate(rows: int, clusters: int, dim: int) -> float:
    """Rows/s of the image-based filter's nearest-centroid assignment (random unit vectors)."""
    rng = np.random.default_rng(3)
    centroids = rng.normal(size=(clusters, dim)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    data = rng.normal(size=(rows, dim)).astype(np.float32)
    start = time.perf_counter()
    nearest_centroid(data, centroids)
    return rows / (time.perf_counter() - start)


def run(args: argparse.Namespace, work: Path) -> None:
    spec = write_pool(work / "pool", args.samples)
    write_eval_folder(work / "eval", work / "pool")
    write_entries(work / "entries.txt", args.entries)
    n = args.samples
    basic = [
        "filter",
        "--shards",
        spec,
        "--preset",
        "datacomp-basic",
        "--output",
        str(work / "basic.parquet"),
    ]
    timed("filter --preset datacomp-basic (shards only)", basic, n)
    text = ["filter", "--shards", spec, "--vocabulary", "imagenet", "--output", str(work / "text.parquet")]
    timed("filter --vocabulary imagenet (shards only)", text, n)
    entries = ["--entries", str(work / "entries.txt"), "--t", str(max(1, n // 20))]
    timed("metaclip", ["metaclip", "--shards", spec, *entries, "--output", str(work / "meta.parquet")], n)
    for method in ("exact", "perceptual"):
        out = ["--output", str(work / f"decontam-{method}")]
        argv = ["decontaminate", "--shards", spec, "--eval-set", str(work / "eval"), "--method", method, *out]
        timed(f"decontaminate --method {method}", argv, n)
    for clusters in args.clusters:
        rate = assignment_rate(20000, clusters, 768)
        print(f"RATE image-based assignment (K={clusters:,}, d=768): {rate:,.0f} rows/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=100000, help="samples in the pool")
    parser.add_argument("--entries", type=int, default=500000, help="random MetaCLIP entries added")
    parser.add_argument("--clusters", type=int, nargs="+", default=[1000, 10000], help="K for the assignment")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-curation-stages-") as tmp:
        run(args, Path(tmp))


if __name__ == "__main__":
    main()
