"""The img2dataset shard layout: writing, atomicity, sizes, and reading back (ours and webdataset's)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from webshards.layout import (
    ShardWriter,
    iter_shard,
    key_for,
    list_shards,
    make_uid,
    read_sizes,
    write_sizes,
)


def jpeg(width: int = 24, height: int = 16, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shard(folder: Path, shard_id: int, successes: int = 3, failures: int = 0) -> list[bytes]:
    """Write a shard of ``successes`` samples then ``failures`` failed rows; returns the image bytes."""
    images = [jpeg(24 + i, 16, (10 * i, 100, 200)) for i in range(successes)]
    with ShardWriter(folder, shard_id) as writer:
        for i, image in enumerate(images):
            meta = {"url": f"http://example.com/{shard_id}/{i}.jpg", "original_width": 100}
            writer.add(key_for(shard_id, i), image, f"caption {i}", meta, extras={"cls": str(i)})
        for j in range(successes, successes + failures):
            uid = make_uid(f"http://example.com/bad/{j}")
            source = {"url": f"http://example.com/bad/{j}"}
            writer.add_failure(key_for(shard_id, j), uid, "bad", "failed_to_decode", "broken", source)
    return images


def test_key_for_follows_img2dataset() -> None:
    assert key_for(1, 3) == "000010003"
    assert key_for(12, 345, index_digits=5) == "0001200345"
    with pytest.raises(ValueError, match="digits"):
        key_for(0, 10000)


def test_make_uid_is_stable_32_hex() -> None:
    uid = make_uid("http://a/b.jpg", "caption")
    assert uid == make_uid("http://a/b.jpg", "caption")
    assert len(uid) == 32 and int(uid, 16) >= 0
    assert uid != make_uid("http://a/b.jpg", "other")


def test_writer_layout_and_stats(tmp_path: Path) -> None:
    images = write_shard(tmp_path, 2, successes=3, failures=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00002.parquet", "00002.tar", "00002_stats.json"]
    stats = json.loads((tmp_path / "00002_stats.json").read_text())
    assert stats["count"] == 4 and stats["successes"] == 3 and stats["failed_to_decode"] == 1
    assert stats["failed_to_download"] == 0 and stats["failed_to_resize"] == 0
    assert stats["end_time"] >= stats["start_time"] and stats["duration"] >= 0
    with tarfile.open(tmp_path / "00002.tar") as tar:
        names = tar.getnames()
    assert names[:4] == ["000020000.jpg", "000020000.txt", "000020000.json", "000020000.cls"]
    assert len(names) == 12  # the failed row has no member
    rows = pq.read_table(tmp_path / "00002.parquet").to_pylist()
    assert [row["status"] for row in rows] == ["success"] * 3 + ["failed_to_decode"]
    assert rows[0]["sha256"] == hashlib.sha256(images[0]).hexdigest()
    assert rows[0]["width"] == 24 and rows[0]["url"] == "http://example.com/2/0.jpg"
    assert rows[3]["error_message"] == "broken" and rows[3]["width"] is None


def test_sample_json_holds_the_contract_fields(tmp_path: Path) -> None:
    images = write_shard(tmp_path, 0, successes=1)
    record = next(iter_shard(tmp_path / "00000.tar"))["json"]
    assert record["key"] == "000000000" and record["caption"] == "caption 0"
    assert (record["width"], record["height"]) == (24, 16)
    assert (record["original_width"], record["original_height"]) == (100, 16)
    assert record["sha256"] == hashlib.sha256(images[0]).hexdigest()
    assert record["uid"] == make_uid("http://example.com/0/0.jpg")
    assert record["url"] == "http://example.com/0/0.jpg"


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="source"), ShardWriter(tmp_path, 0) as writer:
        writer.add("000000000", jpeg(), "no source", {})
    with pytest.raises(ValueError, match="status"), ShardWriter(tmp_path, 0) as writer:
        writer.add_failure("000000000", make_uid("x"), "c", "lost", "?", {"path": "x.jpg"})
    assert list(tmp_path.iterdir()) == []


def test_exception_leaves_nothing_under_final_names(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, 5) as writer:
        writer.add(key_for(5, 0), jpeg(), "a caption", {"path": "a.jpg"})
        raise RuntimeError("crash mid-shard")
    assert list(tmp_path.iterdir()) == []
    assert list_shards(tmp_path) == []


def test_sizes_count_only_complete_shards(tmp_path: Path) -> None:
    write_shard(tmp_path, 0, successes=3, failures=2)
    write_shard(tmp_path, 1, successes=2)
    (tmp_path / "00002.tar").write_bytes(b"")  # an interrupted shard: no _stats.json
    assert [p.name for p in list_shards(tmp_path)] == ["00000.tar", "00001.tar"]
    assert write_sizes(tmp_path) == {"00000.tar": 3, "00001.tar": 2}
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 2}
    assert read_sizes(tmp_path) == {"00000.tar": 3, "00001.tar": 2}
    (tmp_path / "sizes.json").unlink()
    assert read_sizes(tmp_path) == {"00000.tar": 3, "00001.tar": 2}


def test_rewriting_a_shard_replaces_it(tmp_path: Path) -> None:
    write_shard(tmp_path, 0, successes=3)
    write_shard(tmp_path, 0, successes=1)
    assert len(list(iter_shard(tmp_path / "00000.tar"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000.parquet", "00000.tar", "00000_stats.json"]


def test_iter_shard_round_trip(tmp_path: Path) -> None:
    images = write_shard(tmp_path, 3, successes=3)
    samples = list(iter_shard(tmp_path / "00003.tar"))
    assert [s["__key__"] for s in samples] == ["000030000", "000030001", "000030002"]
    assert [s["jpg"] for s in samples] == images
    assert [s["txt"] for s in samples] == ["caption 0", "caption 1", "caption 2"]
    assert [s["cls"] for s in samples] == [b"0", b"1", b"2"]
    assert samples[1]["json"]["key"] == "000030001"
    with open(tmp_path / "00003.tar", "rb") as stream:  # an open stream works too (e.g. fsspec)
        assert [s["jpg"] for s in iter_shard(stream)] == images


def test_webdataset_reads_the_shards(tmp_path: Path) -> None:
    images = write_shard(tmp_path, 0, successes=3)
    dataset = wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False)
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == ["000000000", "000000001", "000000002"]
    assert [s["jpg"] for s in samples] == images
    assert json.loads(samples[0]["json"])["caption"] == "caption 0"
