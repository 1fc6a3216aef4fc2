"""Flaky storage: training from s3:// shards, copying checkpoints to `checkpoint.remote` and back, and
`pretrain push --to` through a store that fails 30% of requests (tests/fault_proxy.py: 503 SlowDown, 500
InternalError, connection resets) give exactly what a clean store gives, with the retries counted; a store
that stays down ends the command with one line, in bounded time. One moto server and proxy for the module."""

from __future__ import annotations

import json
import socket
import time
import zlib
from pathlib import Path

import pytest
from fault_proxy import FaultProxy, flaky_s3, quick_backoff, s3_env
from helpers import TINY, one_torch_thread, read_jsonl, train_in_process

from pretrain.cli import main
from pretrain.training.remote import RemoteStore
from webshards import retries

RUN = [
    "data.train=s3://bucket/shards/{00000..00003}.tar",
    "data.workers=2",
    "train.steps=3",
    "train.batch_size=8",
]
COMPARED = ("step", "samples_seen", "loss", "lr", "logit_scale", "data_skipped")


@pytest.fixture(scope="module")
def store(demo_data):
    """The proxy (30% faults, seeded) in front of a moto bucket holding the demo shards, and a boto3 client
    of moto itself; the project's S3 client goes through the proxy."""
    with flaky_s3(fraction=0.3, seed=0) as (proxy, client), pytest.MonkeyPatch.context() as env:
        for key, value in s3_env(proxy.url).items():
            env.setenv(key, value)
        for path in (demo_data / "train").iterdir():
            if path.suffix in (".tar", ".json"):
                client.upload_file(str(path), "bucket", f"shards/{path.name}")
        yield proxy, client


def objects(client, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix/``, read from moto directly (not through the proxy or the code under test)."""
    listed = client.list_objects_v2(Bucket="bucket", Prefix=f"{prefix}/").get("Contents", [])
    return {
        o["Key"][len(prefix) + 1 :]: client.get_object(Bucket="bucket", Key=o["Key"])["Body"].read()
        for o in listed
    }


def files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory):
    """The same run from the store answering everything, then failing 30%, copying its checkpoint there."""
    proxy, _ = store
    root = tmp_path_factory.mktemp("flaky-runs")
    with one_torch_thread(), quick_backoff():
        proxy.fraction = 0.0
        clean = train_in_process(root, RUN, name="clean")
        proxy.fraction, faults_before = 0.3, sum(proxy.faults.values())
        remote = ["checkpoint.every=3", "checkpoint.remote=s3://bucket/ckpts"]
        flaky = train_in_process(root, [*RUN, *remote], name="flaky")
    return read_jsonl(clean / "metrics.jsonl"), read_jsonl(flaky / "metrics.jsonl"), flaky, faults_before


def test_training_from_a_flaky_store_reads_the_same_samples(store, runs):
    proxy, _ = store
    clean, flaky, _, faults_before = runs
    assert [{k: r[k] for k in COMPARED} for r in flaky] == [{k: r[k] for k in COMPARED} for r in clean]
    assert flaky[-1]["data_skipped"] == 0  # no shard was given up on
    assert sum(proxy.faults.values()) > faults_before  # the store did fail
    assert flaky[-1]["storage_retries"] > clean[-1]["storage_retries"]  # and the run counted retries


def test_a_checkpoint_copied_to_a_flaky_store_and_back_is_identical(store, runs, tmp_path):
    proxy, client = store
    _, _, run_dir, _ = runs
    local = files(run_dir / "checkpoints/step_00000003")  # with its manifest, uploaded as it is
    stored = objects(client, "ckpts/flaky/checkpoints/step_00000003")
    marker = json.loads(stored["_COMPLETE"])
    assert stored == local and marker["files"] == {
        rel: {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
        for rel, data in local.items()
        if rel != "_COMPLETE"
    }
    with quick_backoff():
        RemoteStore("s3://bucket/ckpts", "flaky").download("step_00000003", tmp_path)
    assert files(tmp_path / "step_00000003") == local


def write_export(folder: Path) -> dict[str, bytes]:
    data = {
        "open_clip_config.json": json.dumps({"model_cfg": {"embed_dim": 8}, "preprocess_cfg": {}}).encode(),
        "open_clip_model.safetensors": bytes(range(256)) * 2000,
        "README.md": b"---\nlibrary_name: open_clip\n---\n# test\n",
    }
    folder.mkdir()
    for rel, content in data.items():
        (folder / rel).write_bytes(content)
    return data


def test_push_to_a_flaky_store_is_identical_and_counts_each_retry(store, tmp_path, capsys):
    proxy, client = store
    exported = write_export(tmp_path / "export")
    proxy.faults_to_use = ("slowdown", "internal")  # answers: each one a retry of botocore's (a reset may be
    try:  # resent by aiohttp itself on a kept-alive connection, unseen by botocore)
        faults, counted = sum(proxy.faults.values()), retries.retries_so_far()
        with quick_backoff():
            for _ in range(3):  # pushing again replaces the copy: more requests, more faults to count
                assert main(["push", "--export", str(tmp_path / "export"), "--to", "s3://bucket/pushed"]) == 0
    finally:
        proxy.faults_to_use = ("slowdown", "internal", "reset")
    stored = objects(client, "pushed")
    assert json.loads(stored.pop("_COMPLETE"))["files"].keys() == exported.keys() and stored == exported
    assert retries.retries_so_far() - counted == sum(proxy.faults.values()) - faults > 0
    assert "pushed 3 files" in capsys.readouterr().out


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("down", ["slowdown", "refused"])
def test_a_store_that_stays_down_ends_in_one_line(store, tmp_path, capsys, monkeypatch, down):
    """Real backoff (no quick_backoff), 3 attempts per request: seconds, not a hang."""
    write_export(tmp_path / "export")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    with FaultProxy(store[0].url, fraction=1.0, faults=("slowdown",), max_in_a_row=None) as dead:
        monkeypatch.setenv(
            "AWS_ENDPOINT_URL", dead.url if down == "slowdown" else f"http://127.0.0.1:{closed_port()}"
        )
        start = time.monotonic()
        status = main(["push", "--export", str(tmp_path / "export"), "--to", "s3://bucket/down"])
        seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and seconds < 30
    assert "s3://bucket/down/_COMPLETE: unreachable after " in err and " attempts over " in err, err


def test_training_from_a_store_that_stays_down_ends_in_one_line(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    with FaultProxy(store[0].url, fraction=1.0, faults=("internal",), max_in_a_row=None) as dead:
        monkeypatch.setenv("AWS_ENDPOINT_URL", dead.url)
        start = time.monotonic()
        status = main(["train", "--config", str(TINY), f"run.dir={tmp_path}", *RUN])
        seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and seconds < 30, err
    assert "unreachable after 3 attempts over " in err and "(last: 500" in err, err
