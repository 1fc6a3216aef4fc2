"""Training from s3:// (a local moto S3 server) and http:// (a local HTTP server) shards."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import moto_s3, read_jsonl, serve_files, train_in_process


def train(tmp: Path, spec: str, workers: int) -> list[dict]:
    overrides = [f"data.train={spec}", f"data.workers={workers}", "train.steps=3", "train.batch_size=8"]
    return read_jsonl(train_in_process(tmp, overrides) / "metrics.jsonl")


@pytest.fixture
def http_root(demo_data):
    files = {f"train/{p.name}": p.read_bytes() for p in (demo_data / "train").iterdir() if p.is_file()}
    with serve_files(files) as url:
        yield url


@pytest.mark.parametrize("workers", [0, 2])
def test_trains_from_http_shards(tmp_path, http_root, workers):
    rows = train(tmp_path, f"{http_root}/train/{{00000..00003}}.tar", workers)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["data_skipped"] == 0


@pytest.fixture
def s3_bucket(demo_data, monkeypatch):
    with moto_s3(monkeypatch) as s3:
        for path in (demo_data / "train").iterdir():
            if path.suffix in (".tar", ".json"):
                s3.upload_file(str(path), "bucket", path.name)
        yield "s3://bucket"


@pytest.mark.parametrize("workers", [0, 2])
def test_trains_from_s3_shards(tmp_path, s3_bucket, workers):
    rows = train(tmp_path, f"{s3_bucket}/{{00000..00003}}.tar", workers)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["data_skipped"] == 0
