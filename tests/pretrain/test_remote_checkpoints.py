"""checkpoint.remote: completed checkpoints copied in the background (to S3 on a local moto server, or to a
folder URL), and `resume=latest` on a fresh node resuming from them exactly."""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from helpers import TINY, moto_s3, one_torch_thread, read_jsonl, refused, train_in_process, train_runs
from safetensors.torch import load_file

from pretrain.config import load_config, save_config
from pretrain.training import remote
from pretrain.training.trainer import Trainer

RUN = ["train.steps=3", "checkpoint.every=1", "checkpoint.keep=2"]
"""Three checkpoints: the first run stops after step 2, and the remote prunes to `keep` as the local one does."""


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for every test here (see helpers.one_torch_thread)."""
    with one_torch_thread():
        yield


@pytest.fixture
def s3(monkeypatch):
    """An empty bucket `bucket` on a moto S3 server; the project finds it through AWS_ENDPOINT_URL."""
    with moto_s3(monkeypatch) as client:
        yield client


def bucket_files(client, prefix: str) -> dict[str, bytes]:
    listed = client.list_objects_v2(Bucket="bucket", Prefix=prefix).get("Contents", [])
    return {
        o["Key"][len(prefix) :]: client.get_object(Bucket="bucket", Key=o["Key"])["Body"].read()
        for o in listed
    }


def test_resume_from_s3_on_a_fresh_node_equals_uninterrupted(tmp_path, s3, caplog):
    caplog.set_level(logging.INFO, logger="pretrain")
    straight = train_in_process(tmp_path, RUN, name="straight")
    moved = [*RUN, "checkpoint.remote=s3://bucket/ckpts"]
    first = train_in_process(tmp_path, moved, name="moved", until=2)  # stops after step 2's checkpoint
    first_rows = read_jsonl(first / "metrics.jsonl")
    stored = bucket_files(s3, "ckpts/moved/")
    local = {p.relative_to(first).as_posix(): p.read_bytes() for p in (first / "checkpoints/step_00000002").rglob("*") if p.is_file()}  # fmt: skip
    assert {
        k: v for k, v in stored.items() if k.startswith("checkpoints/step_00000002/")
    } == local  # its own marker too
    assert stored["checkpoints/latest"] == b"step_00000002"

    shutil.rmtree(first)  # a fresh node: the local run directory is gone
    resumed = train_in_process(tmp_path, [*moved, "resume=latest"], name="moved")

    assert "resumed from" in caplog.text and "at step 2" in caplog.text
    rows = read_jsonl(resumed / "metrics.jsonl")
    assert rows[:2] == first_rows[:2]  # the first run's lines (timings too): copied back, not re-trained
    compared = ("step", "samples_seen", "loss", "lr", "logit_scale")
    assert [{k: r[k] for k in compared} for r in rows] == [
        {k: r[k] for k in compared} for r in read_jsonl(straight / "metrics.jsonl")
    ]
    final = "checkpoints/step_00000003/model.safetensors"
    a, b = load_file(straight / final), load_file(resumed / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    stored = bucket_files(s3, "ckpts/moved/")
    folders = sorted({k.split("/")[1] for k in stored if k.startswith("checkpoints/step_")})
    assert folders == ["step_00000002", "step_00000003"]  # checkpoint.keep=2 there too
    assert stored["checkpoints/latest"] == b"step_00000003"
    marker = json.loads(stored["checkpoints/step_00000003/_COMPLETE"])
    folder = resumed / "checkpoints/step_00000003"
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert marker == {"step": 3, "files": {rel: {"size": len(d), "crc32": f"{zlib.crc32(d):08x}"} for rel, d in files.items() if rel != "_COMPLETE"}}  # fmt: skip


def test_a_remote_checkpoint_with_an_older_marker_of_plain_sizes_is_complete(tmp_path):
    """Markers written before webshards.publish listed `{path: bytes}`: still complete, downloaded with sizes
    checked, and a copy made again over one removes only the files it listed."""
    folder = tmp_path / "store/run/checkpoints/step_00000002"
    old = {"model.safetensors": b"m" * 10, "dcp/__0_0.distcp": b"d" * 3}
    for rel, data in old.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    (folder / "notes.txt").write_text("not listed")
    (folder / "_COMPLETE").write_text(json.dumps({"step": 2, "files": {k: len(v) for k, v in old.items()}}))
    store = remote.RemoteStore(str(tmp_path / "store"), "run")
    assert store.newest_complete() == "step_00000002"
    got = store.download("step_00000002", tmp_path / "local")
    marker = {"_COMPLETE": (folder / "_COMPLETE").read_bytes()}  # the local copy keeps it, to verify it by
    assert {
        p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*") if p.is_file()
    } == old | marker
    (got / "dcp/__0_0.distcp").unlink()
    store.upload(got, "step_00000002")
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "_COMPLETE", "model.safetensors", "notes.txt",
    ]  # fmt: skip


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_remote_checkpoint_is_never_loaded(tmp_path, caplog, capsys):
    """A flipped byte in the newest remote copy (a file:// URL: the check runs on the downloaded files, the
    same for every fsspec store), on a fresh node: a warning names the remote file and the reason, and the run
    resumes from the copy before; with every copy damaged, one line and exit 2, not a fresh start at step 0."""
    store = tmp_path / "store"
    moved = [*RUN, f"checkpoint.remote=file://{store}"]
    run = train_in_process(tmp_path, moved, name="moved", until=2)  # remote: step_1, step_2
    shutil.rmtree(run)  # a fresh node
    flip_byte(store / "moved/checkpoints/step_00000002/model.safetensors")
    cfg = load_config(TINY, [f"run.dir={tmp_path}", "run.name=moved", *moved, "resume=latest"])
    trainer = Trainer(cfg)  # resuming is under test, not training
    trainer.close()
    assert trainer.state.step == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"resume=latest: {store}/moved/checkpoints/step_00000002/model.safetensors: its crc32 differs from "
        "the one _COMPLETE lists (corrupted); trying the checkpoint before it"
    ]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]

    shutil.rmtree(run)
    flip_byte(store / "moved/checkpoints/step_00000001/model.safetensors")
    args = ["train", "--config", str(TINY), f"run.dir={tmp_path}", "run.name=moved", *moved, "resume=latest"]
    assert refused(args, capsys) == (
        f"pretrain: error: resume=latest: no intact checkpoint at checkpoint.remote {store}/moved (warnings above)"
    )


def test_a_run_without_resume_refuses_remote_checkpoints_it_would_overwrite(tmp_path):
    overrides = ["train.steps=2", "checkpoint.every=2", f"checkpoint.remote={tmp_path / 'store'}"]
    train_in_process(tmp_path, overrides, name="taken")
    shutil.rmtree(tmp_path / "taken")
    from pretrain.training.state import RunDirError

    with pytest.raises(RunDirError, match=r"already has checkpoints \(step_00000002\); pass resume=latest"):
        train_in_process(tmp_path, overrides, name="taken")


def test_a_failed_copy_is_logged_and_retried(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(remote, "BACKOFF_S", 0.0)
    real_upload, calls = remote.RemoteStore.upload, []

    def flaky(self, folder, name):
        calls.append(name)
        if len(calls) <= 2:
            raise ConnectionError("connection reset by peer")
        real_upload(self, folder, name)

    monkeypatch.setattr(remote.RemoteStore, "upload", flaky)
    store = tmp_path / "store"
    train_in_process(tmp_path, ["train.steps=2", "checkpoint.every=2", f"checkpoint.remote=file://{store}"])
    assert calls == ["step_00000002"] * 3
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "attempt 1/4" in errors[0] and "ConnectionError" in errors[0]
    assert (store / "tiny/checkpoints/step_00000002/_COMPLETE").is_file()
    assert (store / "tiny/checkpoints/latest").read_text() == "step_00000002"


def test_credentials_never_reach_config_yaml_or_logs(tmp_path, monkeypatch, caplog, capsys):
    """An http(s) store cannot take writes: every copy fails, so every path that shows the URL runs."""
    monkeypatch.setattr(remote, "BACKOFF_S", 0.0)
    url = "https://user:hunter2@127.0.0.1:9/models?sig=tok3n&se=2030"
    cfg = load_config(TINY, [f"checkpoint.remote={url}", "data.train=https://h/{0..1}.tar?token=tok3n"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    assert "hunter2" not in saved and "tok3n" not in saved
    assert "https://user:***@127.0.0.1:9/models?sig=***&se=***" in saved and "?token=***" in saved

    with pytest.raises(remote.RemoteError) as failed:
        train_in_process(tmp_path, ["train.steps=1", f"checkpoint.remote={url}"], name="secret")
    assert "could not be copied to https://user:***@127.0.0.1:9/models/secret?sig=***&se=***" in str(
        failed.value
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == remote.ATTEMPTS and "giving up" in errors[-1]
    seen = caplog.text + "".join(capsys.readouterr()) + str(failed.value)
    seen += (tmp_path / "secret/config.yaml").read_text()
    assert "hunter2" not in seen and "tok3n" not in seen


@pytest.mark.slow
def test_fsdp_shards_of_every_rank_resume_from_the_remote(tmp_path):
    """2 FSDP ranks: rank 0 copies both ranks' DCP shards; after losing the run directory (and the copy
    of step 3), resume=latest downloads step 2 and ends where the uninterrupted run did."""
    store = tmp_path / "store"
    args = [
        f"run.dir={tmp_path}", "run.name=fsdp", "train.steps=3", "train.batch_size=8", "log.every=1",
        "checkpoint.every=2", "checkpoint.keep=5", "dist.strategy=fsdp", f"checkpoint.remote={store}",
    ]  # fmt: skip
    straight, copied = tmp_path / "straight", store / "fsdp/checkpoints/step_00000002"
    proc = train_runs(  # in one torchrun: the run, the loss of its folder and of the last copy, the resume
        [
            {"train": args},
            {"move": [str(tmp_path / "fsdp"), str(straight)]},
            {"remove": [str(store / "fsdp/checkpoints/step_00000003")]},
            {"train": [*args, "resume=latest"]},
        ]
    )
    assert sorted(p.name for p in (copied / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "downloading step_00000002" in proc.stdout
    from pretrain.models.build import load_trained

    a = load_trained(straight).model.state_dict()
    b = load_trained(tmp_path / "fsdp").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
