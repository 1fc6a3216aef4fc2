"""Curation benchmark: samples/s of embed (tiny-clip, CPU), of each dedup method, and of build.

Dedup runs end to end (shards or embeddings in, keep list out) on synthetic sets of growing size, so the
printed time ratios show how each method scales (10x the items at ~10x the time is linear).

    .venv/bin/python bench/data_tools.py                        # defaults: dedup on 10k, 30k and 100k items
    .venv/bin/python bench/data_tools.py --sizes 10000 100000 --embed-samples 2048 --build-images 4000
    .venv/bin/python bench/data_tools.py --small                # smoke run: seconds

``--embeddings N`` (default 1M) instead times the partitioned jobs alone: N synthetic embeddings through
``filter --keep-fraction`` and semantic dedup, stage by stage (each a phase of runner tasks), with
``--workers`` and ``--partitions``; ``--engine`` is passed to the runner where it accepts one.

    .venv/bin/python bench/data_tools.py --embeddings 100000 --workers 2
"""

from __future__ import annotations

import argparse
import inspect
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_tools.dedup import DedupConfig, find_duplicates  # noqa: E402
from webshards.layout import ShardWriter, key_for  # noqa: E402

SHARD_ITEMS = 10000
EMBED_DIM = 128  # tiny-clip's


def jpeg_bytes(rng: np.random.Generator, quality: int = 90) -> bytes:
    """A 32x32 JPEG of smooth random blobs (8x8 noise upsampled), so pHash sees structure, not grain."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((32, 32), Image.BILINEAR).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_image_shards(folder: Path, items: int, seed: int = 0) -> list[str]:
    """Shards of ``items`` small JPEGs: 2% byte-identical copies and 2% re-encoded copies of earlier items."""
    rng = np.random.default_rng(seed)
    urls, made = [], []
    for shard in range(-(-items // SHARD_ITEMS)):
        count = min(SHARD_ITEMS, items - shard * SHARD_ITEMS)
        with ShardWriter(folder, shard) as writer:
            for i in range(count):
                roll = rng.random()
                if made and roll < 0.02:
                    data = made[int(rng.integers(len(made)))]
                elif made and roll < 0.04:
                    source = Image.open(io.BytesIO(made[int(rng.integers(len(made)))]))
                    buffer = io.BytesIO()
                    source.save(buffer, format="JPEG", quality=70)
                    data = buffer.getvalue()
                else:
                    data = jpeg_bytes(rng)
                    made.append(data)
                writer.add(key_for(shard, i, 5), data, f"item {i}", {"path": f"{shard}/{i}"})
        urls.append(str(folder / f"{shard:05d}.tar"))
    return urls


def write_embeddings(folder: Path, items: int, seed: int = 0) -> None:
    """Clustered unit embeddings (100 topics, like real ones) with 2% near-copies, in shards of 10k."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_tools.embeddings import METADATA_SCHEMA, embedding_files

    rng = np.random.default_rng(seed)
    topics = rng.normal(size=(100, EMBED_DIM)) / np.sqrt(EMBED_DIM)
    for shard in range(-(-items // SHARD_ITEMS)):
        count = min(SHARD_ITEMS, items - shard * SHARD_ITEMS)
        rows = topics[rng.integers(100, size=count)] + rng.normal(scale=0.08, size=(count, EMBED_DIM))
        copies = np.flatnonzero(rng.random(count) < 0.02)
        rows[copies] = rows[rng.integers(count, size=len(copies))] + rng.normal(
            scale=0.01, size=(len(copies), EMBED_DIM)
        )
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
        files = embedding_files(folder, shard)
        files.image.parent.mkdir(parents=True, exist_ok=True)
        files.metadata.parent.mkdir(parents=True, exist_ok=True)
        np.save(files.image, rows.astype(np.float16))
        uids = [f"{shard:08x}{i:024x}" for i in range(count)]
        meta = {"key": uids, "uid": uids, "caption": [""] * count, "clip_score": rng.random(count)}
        pq.write_table(
            pa.Table.from_pydict(meta, pa.schema([METADATA_SCHEMA.field(n) for n in meta])), files.metadata
        )


def time_dedup(method: str, sizes: list[int], work: Path) -> list[tuple[int, float, dict]]:
    """End-to-end seconds of one method on each size (inputs made once per size, fresh output each time)."""
    results = []
    for size in sizes:
        if method == "semantic":
            inputs = work / f"embeddings-{size}"
            if not inputs.exists():
                write_embeddings(inputs, size)
            kwargs = {"embeddings": inputs}
        else:
            inputs = work / f"images-{size}"
            urls = sorted(str(p) for p in inputs.glob("*.tar")) or write_image_shards(inputs, size)
            kwargs = {"shard_urls": urls}
        output = work / f"{method}-out-{size}"
        start = time.perf_counter()
        report = find_duplicates(output, DedupConfig(method), **kwargs)
        results.append((size, time.perf_counter() - start, report))
        shutil.rmtree(output)
    return results


def bench_partitioned(items: int, work: Path, job_options: dict) -> None:
    """Per-stage seconds and items/s of filter (--keep-fraction 0.3) and semantic dedup as task jobs."""
    from data_tools.filter import FilterConfig
    from data_tools.filter_tasks import filter_job
    from data_tools.phases import JobOptions

    start = time.perf_counter()
    write_embeddings(work / "embeddings", items)
    print(f"{items} synthetic {EMBED_DIM}-d embeddings written in {time.perf_counter() - start:.1f} s")
    jobs = [
        (
            "filter",
            lambda job: filter_job(
                work / "embeddings", work / "keep.parquet", FilterConfig(keep_fraction=0.3), job
            ),
        ),
        (
            "dedup semantic",
            lambda job: find_duplicates(
                work / "dedup", DedupConfig("semantic"), embeddings=work / "embeddings", job=job
            ),
        ),
    ]
    for name, run in jobs:
        job = JobOptions(**job_options)
        start = time.perf_counter()
        run(job)
        total = time.perf_counter() - start
        stages = {**job.timings, f"{name} (merge + outputs)": total - sum(job.timings.values())}
        for stage, seconds in stages.items():
            print(f"  {stage:<34} {seconds:7.1f} s  {items / max(seconds, 1e-9):9.0f} items/s")
        print(
            f"{name:<36} {total:7.1f} s  {items / total:9.0f} items/s (workers {job.workers}, partitions {job.partitions})"
        )


def engine_options(engine: str | None, address: str | None) -> dict:
    """``engine``/``ray_address`` for run_tasks, only if this version of run_tasks takes them."""
    from data_tools.runner import run_tasks

    accepted = inspect.signature(run_tasks).parameters
    wanted = {"engine": engine, "ray_address": address}
    ignored = [k for k, v in wanted.items() if v is not None and k not in accepted]
    if ignored:
        print(f"run_tasks takes no {', '.join(ignored)} (yet): running on the local engine")
    return {k: v for k, v in wanted.items() if v is not None and k in accepted}


def bench_embed(samples: int, work: Path) -> float:
    """Samples/s of embed with an untrained tiny-clip on CPU (model loading excluded)."""
    from data_tools.demo import write_demo_data
    from data_tools.embed import EmbedConfig, embed_shards
    from webshards.layout import list_shards

    write_demo_data(work / "demo", samples=samples, eval_samples=0, samples_per_shard=512, workers=1)
    urls = [str(p) for p in list_shards(work / "demo" / "train")]
    summary = embed_shards(urls, work / "emb", EmbedConfig("tiny-clip", batch_size=256))
    return summary.samples / summary.seconds


def bench_build(images: int, work: Path) -> float | None:
    """Samples/s of build from a folder of 256 px JPEGs to 64 px shards; None without data_tools.build."""
    try:
        from data_tools.build import build
        from data_tools.images import ImageConfig
    except ImportError:
        return None
    rng = np.random.default_rng(0)
    folder = work / "images"
    folder.mkdir()
    for i in range(images):
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((256, 256), Image.BILINEAR).save(folder / f"{i:06d}.jpg")
        (folder / f"{i:06d}.txt").write_text(f"image {i}")
    start = time.perf_counter()
    summary = build(folder, work / "built", samples_per_shard=1000, image=ImageConfig(64, "center_crop"))
    return summary.samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000, 100000], help="dedup items")
    parser.add_argument("--embed-samples", type=int, default=2048, help="samples embedded")
    parser.add_argument("--build-images", type=int, default=2000, help="images built (0: skip)")
    parser.add_argument("--methods", nargs="+", default=["exact", "perceptual", "semantic"])
    parser.add_argument(
        "--embeddings", type=int, nargs="?", const=1_000_000, metavar="N", help="only filter + semantic jobs"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes per job (--embeddings)")
    parser.add_argument("--partitions", type=int, default=16, help="reduce tasks per phase (--embeddings)")
    parser.add_argument("--engine", help="run_tasks engine, e.g. local or ray (where run_tasks has one)")
    parser.add_argument("--ray-address", help="with --engine ray")
    parser.add_argument("--small", action="store_true", help="smoke run: dedup on 500 and 1000 items")
    args = parser.parse_args()
    if args.small:
        args.sizes, args.embed_samples, args.build_images = [500, 1000], 256, 32
    with tempfile.TemporaryDirectory(prefix="bench-data-tools-") as tmp:
        work = Path(tmp)
        if args.embeddings:
            runner = engine_options(args.engine, args.ray_address)
            options = {"workers": args.workers, "partitions": args.partitions, "rank": 0, "world": 1}
            bench_partitioned(args.embeddings, work, {**options, "runner": runner})
            return
        print(f"embed (tiny-clip, CPU, batch 256): {bench_embed(args.embed_samples, work):.0f} samples/s")
        if args.build_images:
            rate = bench_build(args.build_images, work)
            print(
                "build: data_tools.build not found"
                if rate is None
                else f"build (64 px): {rate:.0f} samples/s"
            )
        for method in args.methods:
            results = time_dedup(method, sorted(args.sizes), work)
            for size, seconds, report in results:
                extra = f", {report['clusters']} clusters" if method == "semantic" else ""
                if "hash_seconds" in report:
                    extra += f" (hashing {report['hash_seconds']:.1f} s, grouping and writing the rest)"
                print(
                    f"dedup {method:<10} {size:>7} items: {seconds:6.1f} s, {size / seconds:7.0f} items/s, "
                    f"{report['groups']} groups, {report['removed']} removed{extra}"
                )
            (small, t_small, _), (large, t_large, _) = results[0], results[-1]
            print(f"dedup {method:<10} {large // small}x items -> {t_large / t_small:.1f}x time")


if __name__ == "__main__":
    main()
