"""The whole curation pipeline on a real two-node Ray cluster (tests/ray_cluster.py, the session fixture
of conftest.py): build → embed → filter → dedup (exact, perceptual, semantic) → reshard, each stage on
the previous stage's output of the same engine, writes the same files as the local engine."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import run_cmd, write_export, write_image_folder
from PIL import Image
from ray_cluster import RayCluster, missing_reason

from data_tools.cli import main

SKIP = missing_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

SHARDS, PARTITIONS = 4, 3
"""11 images at 3 per shard; the shuffle partitions of every dedup job."""
TIMING = {"start_time", "end_time", "duration", "seconds", "hash_seconds"}
"""What two runs legitimately differ in: when a shard was written (``_stats.json``) and how long a dedup
took (``report.json``)."""

RAY_DRIVERS = """
import json, sys, ray
from ray._private.state import jobs  # the GCS job table (ray.util.state would need the dashboard)
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps([job["Entrypoint"] for job in jobs()]))
"""


def on_ray(cluster: RayCluster) -> list[str]:
    return ["--engine", "ray", "--ray-address", cluster.address]


def data_tools(args: list[str], cluster: RayCluster | None = None) -> None:
    """Run ``data-tools ARGS``: in this process without a cluster (no start-up cost), else as a command
    inside the cluster's namespace (only there is its head reachable); checks success."""
    if cluster is None:
        assert main(args) == 0, f"data-tools {' '.join(args)} failed"
        return
    proc = cluster.run(["data-tools", *args])
    assert proc.returncode == 0, f"data-tools {args} failed:\n{proc.stdout}\n{proc.stderr}"


def write_inputs(folder: Path) -> None:
    """Nine distinct images plus an exact copy of img001 and a near copy (one pixel off) of img002."""
    write_image_folder(folder, 9, corrupt=False)
    shutil.copy(folder / "img001.png", folder / "img901.png")
    shutil.copy(folder / "img001.txt", folder / "img901.txt")
    pixels = np.array(Image.open(folder / "img002.png"))
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(folder / "img902.png")
    (folder / "img902.txt").write_text("a near copy")


def curate(root: Path, inputs: Path, model: Path, engine: list[str], cluster: RayCluster | None) -> list[str]:
    """Every stage, each on the outputs of the one before, into ``root`` with ``engine``'s options;
    returns the start of each stage's command line (``dedup --method exact``, ``filter --embeddings DIR``)."""
    shards = str(root / "build" / f"{{00000..{SHARDS - 1:05d}}}.tar")
    emb, phases = root / "emb", ["--partitions", str(PARTITIONS)]
    stages = [
        ["build", "--input", str(inputs), "--output", str(root / "build"), "--samples-per-shard", "3",
         "--image-size", "32"],
        ["embed", "--shards", shards, "--model", str(model), "--batch-size", "4", "--output", str(emb)],
        ["filter", "--embeddings", str(emb), "--keep-fraction", "0.7", "--output", str(root / "keep.parquet")],
        ["dedup", "--method", "exact", "--shards", shards, "--output", str(root / "exact"), *phases],
        ["dedup", "--method", "perceptual", "--shards", shards, "--output", str(root / "phash"), *phases],
        ["dedup", "--method", "semantic", "--embeddings", str(emb), "--clusters", "2", "--threshold", "0.001",
         "--output", str(root / "semantic"), *phases],
        ["reshard", "--shards", shards, "--keep", str(root / "keep.parquet"), "--samples-per-shard", "2",
         "--output", str(root / "curated")],
    ]  # fmt: skip
    for stage in stages:
        data_tools([*stage, *engine], cluster)
    return [" ".join(stage[:3]) for stage in stages]


def tree(root: Path) -> dict[str, bytes | dict]:
    """Every file under ``root`` by relative path, with ``root`` itself written as ROOT (keep_summary.json
    and reshard.json name their inputs and outputs); JSON files without their timing fields."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel, data = path.relative_to(root).as_posix(), path.read_bytes().replace(bytes(root), b"ROOT")
        if path.name.endswith("_stats.json") or path.name == "report.json":
            files[rel] = {k: v for k, v in json.loads(data).items() if k not in TIMING}
        else:
            files[rel] = data
    return files


def duplicate_uids(folder: Path) -> list[set[str]]:
    """The uid sets of the duplicate groups of a dedup output."""
    rows = pq.read_table(folder / "duplicates.parquet").to_pylist()
    groups = sorted({row["group"] for row in rows if row["group"] >= 0})
    return [{row["uid"] for row in rows if row["group"] == g} for g in groups]


def ray_drivers(cluster: RayCluster) -> list[str]:
    """The command lines of the processes that joined the cluster as Ray drivers (jobs). The runner joins
    only to run tasks there (``engine_ray.run_on_ray``), so a stage listed here ran its tasks on Ray."""
    proc = cluster.run([sys.executable, "-c", RAY_DRIVERS, cluster.address], timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", ["filter", "dedup"])
def test_filter_and_dedup_take_engine_options(command: str) -> None:
    proc = run_cmd(["data-tools", command, "--help"])
    assert proc.returncode == 0, proc.stderr
    assert "--engine {local,ray}" in proc.stdout and "--ray-address auto|HOST:PORT" in proc.stdout


@pytest.mark.slow
def test_curation_pipeline_on_ray_equals_local(cluster: RayCluster, tmp_path: Path) -> None:
    write_inputs(tmp_path / "images")
    model = write_export(tmp_path / "export")
    local, ray = tmp_path / "local", tmp_path / "ray"
    curate(local, tmp_path / "images", model, [], None)
    stages = curate(ray, tmp_path / "images", model, on_ray(cluster), cluster)
    drivers = ray_drivers(cluster)
    assert [s for s in stages if not any(s in driver for driver in drivers)] == [], "not run on Ray"

    expected, got = tree(local), tree(ray)
    assert sorted(got) == sorted(expected)
    assert not any(".tmp" in name or "work" in name for name in got)  # scratch folders are gone
    for name in expected:
        assert got[name] == expected[name], f"{name} differs between the local and the Ray engine"
    # the inputs' duplicates were found (by uid, from the build's rows): the chain is not vacuous
    uid = {
        row["path"]: row["uid"]
        for p in (ray / "build").glob("*.parquet")
        for row in pq.read_table(p).to_pylist()
    }
    copy, near = {uid["img001.png"], uid["img901.png"]}, {uid["img002.png"], uid["img902.png"]}
    assert duplicate_uids(ray / "exact") == [copy]
    assert sorted(duplicate_uids(ray / "phash"), key=sorted) == sorted([copy, near], key=sorted)
    assert sorted(duplicate_uids(ray / "semantic"), key=sorted) == sorted([copy, near], key=sorted)
    assert pq.read_table(ray / "keep.parquet").num_rows == round(0.7 * 11)
