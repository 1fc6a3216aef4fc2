"""build and reshard with ``--output s3://…`` (a moto S3 server): the objects equal a local output's files,
every shard's marker is uploaded after its tar and parquet, and a rerun skips what is there."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import moto_s3, write_image_folder

import webshards.outputs
from data_tools.build import build
from data_tools.images import ImageConfig
from data_tools.reshard import reshard

TIMING_KEYS = {"start_time", "end_time", "duration"}
"""_stats.json records when its shard was written: the one thing two runs legitimately differ in."""


def comparable(name: str, data: bytes) -> bytes | dict:
    if name.endswith("_stats.json"):
        return {k: v for k, v in json.loads(data).items() if k not in TIMING_KEYS}
    return data


def local_files(folder: Path) -> dict[str, bytes | dict]:
    files = (p for p in sorted(folder.rglob("*")) if p.is_file())
    return {p.relative_to(folder).as_posix(): comparable(p.name, p.read_bytes()) for p in files}


def bucket_files(client, prefix: str) -> dict[str, bytes | dict]:
    """Every object under ``prefix/`` of the test bucket, read with boto3 (not the code under test)."""
    listing = client.list_objects_v2(Bucket="bucket", Prefix=f"{prefix}/").get("Contents", [])
    files = {}
    for item in listing:
        name = item["Key"].removeprefix(f"{prefix}/")
        files[name] = comparable(name, client.get_object(Bucket="bucket", Key=item["Key"])["Body"].read())
    return files


class MarkerCheckingFs:
    """Wraps the fsspec filesystem the shard uploads go through: when a ``_stats.json`` marker is put,
    the shard's tar and parquet must already be in the bucket (asked of boto3 directly)."""

    def __init__(self, fs, client, seen: list[str]) -> None:
        self._fs, self._client, self._seen = fs, client, seen

    def __getattr__(self, name: str):
        return getattr(self._fs, name)

    def put_file(self, local: str, remote: str, **kwargs) -> None:
        if remote.endswith("_stats.json"):
            bucket, key = remote.split("/", 1)
            stem = key.removesuffix("_stats.json")
            for suffix in (".tar", ".parquet"):
                size = self._client.head_object(Bucket=bucket, Key=stem + suffix)["ContentLength"]
                assert size > 0, f"{stem}{suffix} empty when its marker is written"
        self._seen.append(remote.rsplit("/", 1)[-1])
        self._fs.put_file(local, remote, **kwargs)


@pytest.fixture
def s3(monkeypatch):
    with moto_s3(monkeypatch) as client:
        seen: list[str] = []
        wrap = webshards.outputs.url_to_fs

        def checking(url: str):
            fs, path = wrap(url)
            return MarkerCheckingFs(fs, client, seen), path

        monkeypatch.setattr(webshards.outputs, "url_to_fs", checking)
        yield client, seen


def test_build_to_s3_equals_local_and_writes_markers_last(tmp_path: Path, s3) -> None:
    client, seen = s3
    write_image_folder(tmp_path / "images", 7)
    image = ImageConfig(image_size=32)
    build(tmp_path / "images", tmp_path / "local", samples_per_shard=3, image=image)
    summary = build(tmp_path / "images", "s3://bucket/built", samples_per_shard=3, image=image)
    assert summary.done == ["00000", "00001", "00002"]
    assert bucket_files(client, "built") == local_files(tmp_path / "local")  # no .build/ rows left either
    assert seen == [f"0000{i}{suffix}" for i in range(3) for suffix in (".tar", ".parquet", "_stats.json")]
    again = build(tmp_path / "images", "s3://bucket/built/", samples_per_shard=3, image=image)
    assert again.skipped == ["00000", "00001", "00002"] and not again.done
    with pytest.raises(ValueError, match="bucket/built holds a build with other settings"):
        build(tmp_path / "images", "s3://bucket/built", samples_per_shard=2, image=image)


def test_reshard_to_s3_equals_local(tmp_path: Path, s3) -> None:
    client, seen = s3
    write_image_folder(tmp_path / "images", 9, corrupt=False)
    build(tmp_path / "images", tmp_path / "built", samples_per_shard=4, image=ImageConfig(image_size=32))
    uids = [
        u for p in sorted((tmp_path / "built").glob("*.parquet")) for u in pq.read_table(p)["uid"].to_pylist()
    ]
    pq.write_table(pa.table({"uid": uids[1::2] + uids[:2]}), tmp_path / "keep.parquet")
    args = (str(tmp_path / "built" / "{00000..00002}.tar"), [tmp_path / "keep.parquet"])
    reshard(*args, tmp_path / "local", samples_per_shard=3, shuffle_buffer=4, seed=1)
    summary = reshard(*args, "s3://bucket/curated", samples_per_shard=3, shuffle_buffer=4, seed=1)
    assert summary.ok() and len(summary.done) == 2  # 4 + 2 kept samples
    assert bucket_files(client, "curated") == local_files(tmp_path / "local")
    assert seen == [f"0000{i}{suffix}" for i in range(2) for suffix in (".tar", ".parquet", "_stats.json")]
