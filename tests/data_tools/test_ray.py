"""The Ray engine on a real two-node Ray cluster (tests/ray_cluster.py): build, embed and reshard write the
same bytes as the local engine, and a build survives the loss of a node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, run_cmd, write_export, write_image_folder
from ray_cluster import BIN, RayCluster, missing_reason

SKIP = missing_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

TIMING_KEYS = {"start_time", "end_time", "duration"}
"""_stats.json records when its shard was written: the one thing two runs legitimately differ in."""


def on_ray(cluster: RayCluster) -> list[str]:
    return ["--engine", "ray", "--ray-address", cluster.address]


def data_tools(args: list[str], cluster: RayCluster | None = None) -> str:
    """Run ``data-tools ARGS`` (inside the cluster's namespace when given); returns stderr, checks success."""
    command = ["data-tools", *args]
    proc = cluster.run(command) if cluster else run_cmd(command, timeout=600)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stderr


def tree(folder: Path) -> dict[str, bytes | dict]:
    """Every file under ``folder`` by relative path: its bytes, or for _stats.json its fields but timing."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel.endswith("_stats.json"):
            files[rel] = {k: v for k, v in json.loads(path.read_text()).items() if k not in TIMING_KEYS}
        else:
            files[rel] = path.read_bytes()
    return files


def assert_same_tree(local: Path, ray: Path) -> None:
    expected, got = tree(local), tree(ray)
    assert sorted(got) == sorted(expected)
    assert not any(".tmp" in name for name in got)
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


@pytest.mark.slow
def test_build_embed_reshard_on_ray_equal_local(cluster: RayCluster, tmp_path: Path) -> None:
    write_image_folder(tmp_path / "images", 11)  # + one broken image: a failed_to_decode row
    local, ray = tmp_path / "local", tmp_path / "ray"
    build = ["build", "--input", str(tmp_path / "images"), "--samples-per-shard", "3", "--image-size", "32"]
    data_tools([*build, "--output", str(local / "build"), "--workers", "2"])
    log = data_tools([*build, "--output", str(ray / "build"), *on_ray(cluster)], cluster)
    assert "build: 4 done, 0 skipped, 0 failed" in log
    assert_same_tree(local / "build", ray / "build")

    shards = str(local / "build" / "{00000..00003}.tar")
    embed = [
        "embed",
        "--shards",
        shards,
        "--model",
        str(write_export(tmp_path / "export")),
        "--batch-size",
        "4",
    ]
    data_tools([*embed, "--output", str(local / "emb")])
    data_tools([*embed, "--output", str(ray / "emb"), *on_ray(cluster)], cluster)
    assert_same_tree(local / "emb", ray / "emb")

    kept = write_keep_list(local / "build", tmp_path / "keep.parquet")
    reshard = [
        "reshard",
        "--shards",
        shards,
        "--keep",
        str(tmp_path / "keep.parquet"),
        "--samples-per-shard",
        "2",
    ]
    reshard += ["--shuffle-buffer", "3", "--seed", "7"]
    data_tools([*reshard, "--output", str(local / "reshard")])
    data_tools([*reshard, "--output", str(ray / "reshard"), *on_ray(cluster)], cluster)
    assert_same_tree(local / "reshard", ray / "reshard")
    assert sum(json.loads((local / "reshard" / "sizes.json").read_text()).values()) == kept


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
