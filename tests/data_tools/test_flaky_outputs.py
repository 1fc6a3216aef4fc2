"""Flaky storage: a data-tools job writing its shards to s3:// through a store that fails 30% of requests
(tests/fault_proxy.py) writes what it writes locally, and its summary counts the retries; a store that
stays down ends the job with one line."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from fault_proxy import flaky_s3, quick_backoff, s3_env
from helpers import lineage_identity, write_image_folder

from data_tools.build import build
from data_tools.cli import main
from data_tools.images import ImageConfig
from webshards import retries

TIMING_KEYS = {"start_time", "end_time", "duration"}
"""What two builds of the same input legitimately differ in (in each ``_stats.json``)."""


def comparable(name: str, data: bytes) -> bytes | dict:
    if name.endswith("lineage.json"):  # names its locations and times: compared by what the stage did
        return lineage_identity(data)
    if name.endswith("_stats.json"):
        return {k: v for k, v in json.loads(data).items() if k not in TIMING_KEYS}
    return data


@pytest.fixture
def store(monkeypatch):
    with flaky_s3(fraction=0.3, seed=1) as (proxy, client), quick_backoff():
        for key, value in s3_env(proxy.url).items():
            monkeypatch.setenv(key, value)
        yield proxy, client


def test_build_to_a_flaky_store_equals_local_and_counts_retries(tmp_path: Path, store) -> None:
    proxy, client = store
    proxy.faults_to_use = ("slowdown", "internal")  # each one a retry of botocore's (see test_flaky_storage)
    write_image_folder(tmp_path / "images", 7)
    image = ImageConfig(image_size=32)
    build(tmp_path / "images", tmp_path / "local", samples_per_shard=3, image=image)
    counted = retries.retries_so_far()
    summary = build(tmp_path / "images", "s3://bucket/built", samples_per_shard=3, image=image)

    assert summary.done == ["00000", "00001", "00002"]
    listed = client.list_objects_v2(Bucket="bucket", Prefix="built/")["Contents"]
    stored = {
        o["Key"][len("built/") :]: comparable(
            o["Key"], client.get_object(Bucket="bucket", Key=o["Key"])["Body"].read()
        )
        for o in listed
    }
    local = tmp_path / "local"
    assert stored == {p.relative_to(local).as_posix(): comparable(p.name, p.read_bytes()) for p in sorted(local.rglob("*")) if p.is_file()}  # fmt: skip
    assert retries.retries_so_far() - counted == sum(proxy.faults.values()) > 0
    assert summary.storage_retries > 0
    assert f"; {summary.storage_retries} storage retries" in summary.line("build")


def test_a_store_that_refuses_connections_ends_the_job_in_one_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {**s3_env(f"http://127.0.0.1:{port}"), "AWS_MAX_ATTEMPTS": "3"}.items():
        monkeypatch.setenv(key, value)
    write_image_folder(tmp_path / "images", 3)
    start = time.monotonic()
    assert main(["build", "--input", str(tmp_path / "images"), "--output", "s3://bucket/down"]) == 1
    err = capsys.readouterr().err
    assert time.monotonic() - start < 30 and err.count("\n") == 1, err
    assert (
        err.startswith("data-tools: error: s3://bucket/down/") and "unreachable after 3 attempts over" in err
    )
