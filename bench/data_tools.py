"""Curation benchmark: samples/s of embed (tiny-clip, CPU), of each dedup method, of build and reshard.

Dedup runs end to end (shards or embeddings in, keep list out) on synthetic sets of growing size, so the
printed time ratios show how each method scales (10x the items at ~10x the time is linear).

    .venv/bin/python bench/data_tools.py                        # defaults: dedup on 10k, 30k and 100k items
    .venv/bin/python bench/data_tools.py --sizes 10000 100000 --embed-samples 2048 --build-images 4000
    .venv/bin/python bench/data_tools.py --small                # smoke run: seconds

``--embeddings N`` (default 1M) instead times the partitioned jobs alone: N synthetic embeddings through
``filter --keep-fraction`` and semantic dedup, stage by stage (each a phase of runner tasks), with
``--workers`` and ``--partitions``, on ``--engine local`` or on the Ray cluster at ``--engine ray
--ray-address HOST:PORT``. ``--engine ray`` without an address compares the local engine with a Ray
cluster of 1 and of 2 nodes (1 CPU each) that it starts in a private network namespace like the tests
(tests/ray_cluster.py; needs ``unshare -n``), and prints a table of seconds per stage.

    .venv/bin/python bench/data_tools.py --embeddings 100000 --workers 2
    .venv/bin/python bench/data_tools.py --embeddings 1000000 --engine ray
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from data_tools.dedup import DedupConfig, find_duplicates  # noqa: E402
from data_tools.runner import RunnerOptions  # noqa: E402
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
        report = find_duplicates(output, DedupConfig(method), RunnerOptions(), **kwargs)
        results.append((size, time.perf_counter() - start, report))
        shutil.rmtree(output)
    return results


def bench_partitioned(items: int, work: Path, job_options: dict) -> dict[str, float]:
    """Per-stage seconds and items/s of filter (--keep-fraction 0.3) and semantic dedup as task jobs,
    printed and returned (stage -> seconds). The embeddings are written once per ``work`` folder."""
    from data_tools.filter import FilterConfig
    from data_tools.filter_tasks import filter_job

    embeddings = work / f"embeddings-{items}"
    if not embeddings.exists():
        start = time.perf_counter()
        write_embeddings(embeddings, items)
        print(f"{items} synthetic {EMBED_DIM}-d embeddings written in {time.perf_counter() - start:.1f} s")
    jobs = {
        "filter": lambda job: filter_job(
            embeddings, work / "keep.parquet", FilterConfig(keep_fraction=0.3), job
        ),
        "dedup semantic": lambda job: find_duplicates(
            work / "dedup", DedupConfig("semantic"), job, embeddings=embeddings
        ),
    }
    times = {}
    for name, run in jobs.items():
        job = RunnerOptions(**job_options)
        start = time.perf_counter()
        run(job)
        total = time.perf_counter() - start
        stages = {**job.timings, f"{name} (merge + outputs)": total - sum(job.timings.values())}
        for stage, seconds in stages.items():
            print(f"  {stage:<34} {seconds:7.1f} s  {items / max(seconds, 1e-9):9.0f} items/s")
        print(
            f"{name:<36} {total:7.1f} s  {items / total:9.0f} items/s (workers {job.workers}, partitions {job.partitions})"
        )
        times |= {**stages, name: total}
    shutil.rmtree(work / "dedup", ignore_errors=True)
    return times


def bench_ray_scaling(args: argparse.Namespace, work: Path) -> None:
    """filter + semantic dedup on the local engine, then on a private Ray cluster of 1 and of 2 nodes
    (1 CPU each, tests/ray_cluster.py: a network namespace, loopback only), with a per-stage table."""
    options = {"workers": args.workers, "partitions": args.partitions, "rank": 0, "world": 1}
    columns = {f"local ({args.workers} worker)": bench_partitioned(args.embeddings, work, options)}
    for nodes in (1, 2):
        print(f"--- Ray, {nodes} node(s) of 1 CPU")
        with private_ray_cluster(nodes) as cluster:
            command = [sys.executable, __file__, "--embeddings", str(args.embeddings), "--work", str(work)]
            command += [
                "--partitions",
                str(args.partitions),
                "--engine",
                "ray",
                "--ray-address",
                cluster.address,
            ]
            proc = cluster.run(command, timeout=24 * 3600)
        if proc.returncode != 0:
            raise SystemExit(
                f"the Ray run with {nodes} node(s) failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
            )
        lines = proc.stdout.splitlines()
        print("\n".join(line for line in lines if not line.startswith(TIMES)))
        columns[f"Ray {nodes} node"] = json.loads(
            next(line for line in lines if line.startswith(TIMES))[len(TIMES) :]
        )
    print_table(columns, args.embeddings)


TIMES = "stage seconds: "
"""The line on which a Ray run (a child process inside the cluster's namespace) hands its times back."""


def print_table(columns: dict[str, dict[str, float]], items: int) -> None:
    """Seconds per stage and engine (markdown), then each engine's speed-up over the first column."""
    names, first = list(columns), next(iter(columns.values()))
    print(f"\n| stage ({items} embeddings) | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for stage in first:
        cells = [f"{columns[name].get(stage, float('nan')):.1f} s" for name in names]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    for job in ("filter", "dedup semantic"):
        ratios = ", ".join(f"{name} {first[job] / columns[name][job]:.2f}x" for name in names[1:])
        print(f"{job}: speed-up over {names[0]}: {ratios}")


@contextmanager
def private_ray_cluster(nodes: int) -> Iterator[Any]:
    """A started test cluster (tests/ray_cluster.py) of ``nodes`` (1 or 2) nodes with 1 CPU each.

    Token authentication off: Ray turns it on for the head only when ``~/.ray/auth_token`` exists, and a
    joining node is then refused; the namespace is reachable by nothing else."""
    sys.path.insert(0, str(ROOT / "tests"))
    from ray_cluster import RayCluster, missing_reason

    reason = missing_reason()
    if reason:
        raise SystemExit(f"cannot start a private Ray cluster here: {reason}")

    class HeadOnly(RayCluster):
        def add_worker(self, expected: int = 1) -> None:
            """No worker node: wait until the head alone is alive."""
            self._wait_for(lambda: self.alive_nodes() == 1, "the Ray head node", 180)

    cluster = RayCluster() if nodes == 2 else HeadOnly()
    with cluster:
        yield cluster


def bench_embed(samples: int, work: Path) -> float:
    """Samples/s of embed with an untrained tiny-clip on CPU (model loading excluded)."""
    from data_tools.embed import EmbedConfig, embed_shards
    from webshards.demo_data import write_demo_data
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


def bench_reshard(items: int, work: Path) -> tuple[float, float]:
    """Input and output samples/s of reshard: ``items`` samples in, every other uid kept, 10k per shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_tools.reshard import reshard

    folder = work / "reshard-in"
    urls = write_image_shards(folder, items, seed=1)
    uids = [u for url in urls for u in pq.read_table(Path(url).with_suffix(".parquet"))["uid"].to_pylist()]
    pq.write_table(pa.table({"uid": uids[::2]}), work / "reshard-keep.parquet")
    spec = f"{folder}/{{00000..{len(urls) - 1:05d}}}.tar"
    start = time.perf_counter()
    summary = reshard(
        spec, [work / "reshard-keep.parquet"], work / "reshard-out", samples_per_shard=SHARD_ITEMS
    )
    seconds = time.perf_counter() - start
    return items / seconds, summary.samples / seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000, 100000], help="dedup items")
    parser.add_argument("--embed-samples", type=int, default=2048, help="samples embedded")
    parser.add_argument("--build-images", type=int, default=2000, help="images built (0: skip)")
    parser.add_argument("--reshard-items", type=int, default=100000, help="samples resharded (0: skip)")
    parser.add_argument("--methods", nargs="+", default=["exact", "perceptual", "semantic"])
    parser.add_argument(
        "--embeddings", type=int, nargs="?", const=1_000_000, metavar="N", help="only filter + semantic jobs"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes per job (--embeddings)")
    parser.add_argument("--partitions", type=int, default=16, help="reduce tasks per phase (--embeddings)")
    parser.add_argument(
        "--engine",
        help="run_tasks engine: local, or ray (without --ray-address: local, then Ray of 1 and 2 nodes)",
    )
    parser.add_argument("--ray-address", help="with --engine ray: an existing cluster")
    parser.add_argument("--work", type=Path, help="folder for the inputs (default: a temp folder)")
    parser.add_argument("--small", action="store_true", help="smoke run: dedup on 500 and 1000 items")
    args = parser.parse_args()
    if args.small:
        args.sizes, args.embed_samples, args.build_images, args.reshard_items = [500, 1000], 256, 32, 1000
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        run_bench(args, args.work)
        return
    with tempfile.TemporaryDirectory(prefix="bench-data-tools-") as tmp:
        run_bench(args, Path(tmp))


def run_bench(args: argparse.Namespace, work: Path) -> None:
    """The benchmarks ``args`` ask for, with their inputs and outputs under ``work``."""
    if args.embeddings and args.engine == "ray" and not args.ray_address:
        bench_ray_scaling(args, work)
    elif args.embeddings:
        runner = {"engine": args.engine or "local", "ray_address": args.ray_address}
        options = {"workers": args.workers, "partitions": args.partitions, "rank": 0, "world": 1}
        times = bench_partitioned(args.embeddings, work, {**options, **runner})
        print(TIMES + json.dumps(times))
    else:
        bench_curation(args, work)


def bench_curation(args: argparse.Namespace, work: Path) -> None:
    """embed, build and every dedup method end to end (the default run)."""
    print(f"embed (tiny-clip, CPU, batch 256): {bench_embed(args.embed_samples, work):.0f} samples/s")
    if args.build_images:
        rate = bench_build(args.build_images, work)
        print("build: data_tools.build not found" if rate is None else f"build (64 px): {rate:.0f} samples/s")
    if args.reshard_items:
        scanned, written = bench_reshard(args.reshard_items, work)
        print(f"reshard (keep 1/2): {scanned:.0f} input samples/s, {written:.0f} written samples/s")
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
