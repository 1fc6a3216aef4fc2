"""The Ray engine on a real two-node Ray cluster (tests/ray_cluster.py, the session fixture of conftest.py):
the whole curation chain, build → embed → filter (by score; by caption and size from the shards) → dedup (exact,
perceptual, semantic) → image-based filter → decontaminate → metaclip → reshard, each stage on the previous
stage's output of the same engine, writes the same files as the local engine; so do a build and a reshard to S3; and a build survives the loss of a node.

Everything that needs the cluster is in this one module: `pytest -n 2 --dist loadfile` then starts one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, lineage_identity, write_export, write_image_folder
from PIL import Image
from ray_cluster import BIN, RayCluster, missing_reason

from data_tools.cli import main

SKIP = missing_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

SHARDS, PARTITIONS = 4, 3
"""12 input rows (11 images, one broken) at 3 per shard; the shuffle partitions of every dedup job."""
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


def data_tools(args: list[str], cluster: RayCluster | None = None) -> str:
    """Run ``data-tools ARGS``: in this process without a cluster (no start-up cost), else as a command
    inside the cluster's namespace (only there is its head reachable); checks success, returns its stderr
    (empty in this process)."""
    if cluster is None:
        assert main(args) == 0, f"data-tools {' '.join(args)} failed"
        return ""
    proc = cluster.run(["data-tools", *args])
    assert proc.returncode == 0, f"data-tools {args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stderr


def tree(root: Path) -> dict[str, bytes | dict]:
    """Every file under ``root`` by relative path, with ``root`` itself written as ROOT (keep_summary.json
    and reshard.json name their inputs and outputs); JSON files without their timing fields."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel, data = path.relative_to(root).as_posix(), path.read_bytes().replace(bytes(root), b"ROOT")
        if path.name.endswith("lineage.json"):  # names the engine and times: compared by what the stage did
            files[rel] = lineage_identity(data)
        elif path.name.endswith("_stats.json") or path.name == "report.json":
            files[rel] = {k: v for k, v in json.loads(data).items() if k not in TIMING}
        else:
            files[rel] = data
    return files


def assert_same_tree(local: Path, ray: Path) -> None:
    expected, got = tree(local), tree(ray)
    assert sorted(got) == sorted(expected)
    assert not any(".tmp" in name or "work" in name for name in got)  # scratch folders are gone
    for name in expected:
        assert got[name] == expected[name], f"{name} differs between the local and the Ray engine"


def write_keep_list(build: Path, path: Path) -> int:
    """Every other successful uid of a build, read from its parquets; returns how many."""
    uids = []
    for parquet in sorted(build.glob("*.parquet")):
        table = pq.read_table(parquet, columns=["uid", "status"]).to_pylist()
        uids += [row["uid"] for row in table if row["status"] == "success"]
    pq.write_table(pa.table({"uid": uids[::2]}), path)
    return len(uids[::2])


def test_every_node_uses_loopback(cluster: RayCluster) -> None:
    nodes = cluster.nodes()
    assert len(nodes) == 2 and all(node["alive"] for node in nodes)
    assert {node["address"] for node in nodes} == {"127.0.0.1"}


def write_inputs(folder: Path) -> None:
    """Nine distinct images, a broken one (a failed_to_decode row), an exact copy of img001 and a near copy
    (one pixel off) of img002."""
    write_image_folder(folder, 9)
    shutil.copy(folder / "img001.png", folder / "img901.png")
    shutil.copy(folder / "img001.txt", folder / "img901.txt")
    pixels = np.array(Image.open(folder / "img002.png"))
    pixels[0, 0] ^= 1
    Image.fromarray(pixels).save(folder / "img902.png")
    (folder / "img902.txt").write_text("a near copy")


def curate(
    root: Path, inputs: Path, model: Path, engine: list[str], cluster: RayCluster | None
) -> list[tuple[str, str]]:
    """Every stage, each on the outputs of the one before, into ``root`` with ``engine``'s options;
    returns the start of each stage's command line (``dedup --method exact``, ``filter --embeddings DIR``)
    with its stderr."""
    shards = str(root / "build" / f"{{00000..{SHARDS - 1:05d}}}.tar")
    emb, phases = root / "emb", ["--partitions", str(PARTITIONS)]
    entries = inputs.parent / "entries.txt"
    entries.write_text("word\nword word word\nnear\n")  # captions are "word" x (i + 1) and "a near copy"
    targets = inputs.parent / "targets"  # an eval "set" for the image-based filter and decontamination
    targets.mkdir(exist_ok=True)
    shutil.copy(inputs / "img001.png", targets / "img001.png")
    stages = [
        ["build", "--input", str(inputs), "--output", str(root / "build"), "--samples-per-shard", "3",
         "--image-size", "32"],
        ["embed", "--shards", shards, "--model", str(model), "--batch-size", "4", "--output", str(emb)],
        ["filter", "--embeddings", str(emb), "--keep-fraction", "0.7", "--output", str(root / "keep.parquet")],
        ["filter", "--shards", shards, "--language", "en,de", "--min-chars", "6", "--max-aspect-ratio", "1.5",
         "--output", str(root / "text_keep.parquet")],
        ["dedup", "--method", "exact", "--shards", shards, "--output", str(root / "exact"), *phases],
        ["dedup", "--method", "perceptual", "--shards", shards, "--output", str(root / "phash"), *phases],
        ["dedup", "--method", "semantic", "--embeddings", str(emb), "--clusters", "2", "--threshold", "0.001",
         "--output", str(root / "semantic"), *phases],
        ["filter", "--embeddings", str(emb), "--target", str(targets), "--clusters", "3", "--output",
         str(root / "image_keep.parquet")],
        ["decontaminate", "--shards", shards, "--eval-set", str(targets), "--method", "perceptual", "--output",
         str(root / "decontam")],
        ["metaclip", "--shards", shards, "--entries", str(entries), "--t", "3", "--output",
         str(root / "metaclip.parquet")],
        ["reshard", "--shards", shards, "--keep", str(root / "keep.parquet"), "--samples-per-shard", "2",
         "--shuffle-buffer", "3", "--seed", "7", "--output", str(root / "curated")],
    ]  # fmt: skip
    return [(" ".join(stage[:3]), data_tools([*stage, *engine], cluster)) for stage in stages]


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


@pytest.mark.slow
def test_curation_pipeline_on_ray_equals_local(cluster: RayCluster, tmp_path: Path) -> None:
    write_inputs(tmp_path / "images")
    model = write_export(tmp_path / "export")
    local, ray = tmp_path / "local", tmp_path / "ray"
    curate(local, tmp_path / "images", model, [], None)
    stages = curate(ray, tmp_path / "images", model, on_ray(cluster), cluster)
    assert f"build: {SHARDS} done, 0 skipped, 0 failed" in stages[0][1]
    drivers = ray_drivers(cluster)
    assert [s for s, _ in stages if not any(s in driver for driver in drivers)] == [], "not run on Ray"
    assert_same_tree(local, ray)

    # the inputs' duplicates were found (by uid, from the build's rows): the chain is not vacuous
    rows = [row for p in (ray / "build").glob("*.parquet") for row in pq.read_table(p).to_pylist()]
    uid = {row["path"]: row["uid"] for row in rows}
    assert [row["status"] for row in rows if row["path"] == "broken.jpg"] == ["failed_to_decode"]
    copy, near = {uid["img001.png"], uid["img901.png"]}, {uid["img002.png"], uid["img902.png"]}
    assert duplicate_uids(ray / "exact") == [copy]
    assert sorted(duplicate_uids(ray / "phash"), key=sorted) == sorted([copy, near], key=sorted)
    assert sorted(duplicate_uids(ray / "semantic"), key=sorted) == sorted([copy, near], key=sorted)
    kept = pq.read_table(ray / "keep.parquet").num_rows
    assert kept == round(0.7 * 11)
    assert sum(json.loads((ray / "curated" / "sizes.json").read_text()).values()) == kept
    balanced = json.loads((ray / "metaclip_entry_counts.json").read_text())["entry_counts"]
    assert {e: c["before"] for e, c in balanced.items()} == {"word": 10, "word word word": 7, "near": 1}
    decontam = json.loads((ray / "decontam" / "report.json").read_text())  # img001 and its copy img901
    assert decontam["eval_sets"][0]["training_removed"] >= 2, decontam
    image_based = json.loads((ray / "image_keep_summary.json").read_text())
    assert 0 < image_based["kept"] < 11, image_based  # the target's cluster, not all three
    text = json.loads((ray / "text_keep_summary.json").read_text())  # "word" (4 characters) fails
    assert (
        text["samples"] == 11
        and text["failed_rule"]["min_chars"] == 1
        and sum(text["languages"].values()) == 11
    )


SERVER = """
import pathlib, sys, time
sys.path.insert(0, {tests!r})
from helpers import serve_files
files = {{p.name: p.read_bytes() for p in pathlib.Path({folder!r}).glob("*.png")}}
with serve_files(files, delay={delay}) as url:
    print(url, flush=True)
    time.sleep(1e9)
"""


def serve_slowly(cluster: RayCluster, folder: Path, delay: float) -> str:
    """Serve the PNGs of ``folder`` over HTTP inside the cluster's namespace, each after ``delay`` seconds;
    returns the base URL."""
    script = SERVER.format(tests=str(ROOT / "tests"), folder=str(folder), delay=delay)
    server = cluster.popen([sys.executable, "-c", script])
    return server.stdout.readline().strip()


def kill_when_busy(cluster: RayCluster, node: str, timeout: float = 120) -> None:
    """SIGKILL ``node``'s raylet as soon as one of its workers is running a task."""
    raylet = cluster.raylet_pids()[node]
    deadline = time.monotonic() + timeout
    while not cluster.running_task_workers(raylet):
        assert time.monotonic() < deadline, "no task ever ran on the worker node"
        time.sleep(0.1)
    os.kill(raylet, signal.SIGKILL)


@pytest.mark.slow
def test_build_survives_losing_a_node(cluster: RayCluster, tmp_path: Path) -> None:
    write_image_folder(tmp_path / "images", 16, corrupt=False)
    base = serve_slowly(cluster, tmp_path / "images", delay=0.5)
    rows = [f"{base}/img{i:03d}.png,caption {i}" for i in range(16)]
    (tmp_path / "urls.csv").write_text("url,caption\n" + "\n".join(rows) + "\n")
    build = ["build", "--input", str(tmp_path / "urls.csv"), "--samples-per-shard", "2", "--threads", "1"]
    build += ["--image-size", "32"]
    local = data_tools([*build, "--output", str(tmp_path / "local"), "--workers", "2"], cluster)
    assert "8 done, 0 skipped, 0 failed" in local
    job = cluster.popen(["data-tools", *build, "--output", str(tmp_path / "ray"), *on_ray(cluster)])
    kill_when_busy(cluster, "worker1")
    assert job.wait(timeout=600) == 0
    assert cluster.alive_nodes() == 1  # the node is gone, its tasks ran again on the head node
    assert_same_tree(tmp_path / "local", tmp_path / "ray")
    cluster.add_worker(expected=2)  # the module's other tests get two nodes again


MOTO_PORT = 5555  # inside the namespace: free
S3_ENV = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{MOTO_PORT}"}
BUCKET = """
import pathlib, sys, time, boto3
client = boto3.client("s3")
command, prefix, dest = sys.argv[1:4]
for attempt in range(100):
    try:
        if command == "create":
            client.create_bucket(Bucket="bucket")
        break
    except Exception:
        time.sleep(0.2)
for item in client.list_objects_v2(Bucket="bucket", Prefix=prefix + "/").get("Contents", []):
    path = pathlib.Path(dest) / item["Key"].removeprefix(prefix + "/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(client.get_object(Bucket="bucket", Key=item["Key"])["Body"].read())
"""


def bucket(cluster: RayCluster, command: str, prefix: str = "", dest: str = "") -> None:
    """``create`` the test bucket, or ``get`` the objects under ``prefix/`` into folder ``dest``."""
    proc = cluster.run([sys.executable, "-c", BUCKET, command, prefix, dest], env=S3_ENV)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_build_and_reshard_to_s3_on_ray(cluster: RayCluster, tmp_path: Path) -> None:
    cluster.popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(MOTO_PORT)], stdout=subprocess.DEVNULL
    )
    bucket(cluster, "create")
    write_image_folder(tmp_path / "images", 8, corrupt=False)
    build = ["build", "--input", str(tmp_path / "images"), "--samples-per-shard", "3", "--image-size", "32"]
    data_tools([*build, "--output", str(tmp_path / "local")])
    job = cluster.run(["data-tools", *build, "--output", "s3://bucket/built", *on_ray(cluster)], env=S3_ENV)
    assert job.returncode == 0 and "3 complete shards, 8 samples in s3://bucket/built/" in job.stdout, (
        job.stderr
    )
    bucket(cluster, "get", "built", str(tmp_path / "built"))
    assert_same_tree(tmp_path / "local", tmp_path / "built")

    kept = write_keep_list(tmp_path / "local", tmp_path / "keep.parquet")
    shards = str(tmp_path / "local" / "{00000..00002}.tar")
    reshard = [
        "reshard",
        "--shards",
        shards,
        "--keep",
        str(tmp_path / "keep.parquet"),
        "--samples-per-shard",
        "3",
    ]
    data_tools([*reshard, "--output", str(tmp_path / "curated-local")])
    job = cluster.run(
        ["data-tools", *reshard, "--output", "s3://bucket/curated", *on_ray(cluster)], env=S3_ENV
    )
    assert job.returncode == 0, job.stderr
    bucket(cluster, "get", "curated", str(tmp_path / "curated"))
    assert_same_tree(tmp_path / "curated-local", tmp_path / "curated")
    assert sum(json.loads((tmp_path / "curated" / "sizes.json").read_text()).values()) == kept
