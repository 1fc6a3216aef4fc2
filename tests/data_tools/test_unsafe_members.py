"""A shard member whose name escapes its sample (``../``, an absolute path) is a bad sample: never read,
never written anywhere, counted where bad samples are counted."""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY
from PIL import Image

from data_tools.reshard import reshard
from pretrain.config import load_config
from pretrain.data.loader import WebDatasetSource
from pretrain.models.build import build_model
from webshards.layout import UNSAFE_MEMBER, iter_shard, list_shards


def jpeg(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, format="JPEG")
    return out.getvalue()


def members(key: str, uid: str) -> list[tuple[str, bytes]]:
    meta = {"key": key, "uid": uid, "caption": f"sample {uid[0]}", "path": f"{uid[0]}.jpg"}
    return [(f"{key}.jpg", jpeg((200, 10, 10))), (f"{key}.txt", meta["caption"].encode()),
            (f"{key}.json", json.dumps(meta).encode())]  # fmt: skip


@pytest.fixture
def hostile(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """shards/00000.tar: samples 000000 and 000003 are fine; `../evil` and an absolute path are not.
    Returns the shard folder, the absolute target's folder, and the uids in tar order."""
    folder, outside = tmp_path / "shards", tmp_path / "outside"
    folder.mkdir()
    uids = [c * 32 for c in "abcd"]
    keys = ["000000", "../evil", str(outside / "abs"), "000003"]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, uid in zip(keys, uids):
            for name, data in members(key, uid):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stats = {
        "count": 4,
        "successes": 4,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "failed_to_decode": 0,
    }
    (folder / "00000_stats.json").write_text(json.dumps(stats))
    with tarfile.open(folder / "00000.tar") as tar:  # the names went in as written
        assert {"../evil.txt", str(outside / "abs.jpg")} <= set(tar.getnames())
    return folder, outside, uids


def assert_nothing_escaped(tmp_path: Path, outside: Path) -> None:
    assert not outside.exists()
    assert not [p for p in tmp_path.rglob("evil*")] and not (tmp_path.parent / "evil.txt").exists()


def test_iter_shard_leaves_unsafe_samples_out_and_counts_them(hostile, tmp_path: Path) -> None:
    folder, outside, _ = hostile
    skipped: dict[str, int] = {}
    samples = list(iter_shard(folder / "00000.tar", skipped=skipped))
    assert [s["__key__"] for s in samples] == ["000000", "000003"]
    assert skipped == {UNSAFE_MEMBER: 2}
    marked = list(iter_shard(folder / "00000.tar", mark_unsafe=True))
    assert [s.get(UNSAFE_MEMBER) for s in marked] == [None, "../evil.jpg", str(outside / "abs.jpg"), None]
    assert all(set(s) == {"__key__", UNSAFE_MEMBER} for s in marked[1:3])  # no member was read
    assert_nothing_escaped(tmp_path, outside)


def test_reshard_writes_only_the_safe_samples(hostile, tmp_path: Path) -> None:
    folder, outside, uids = hostile
    keep = tmp_path / "keep.parquet"
    pq.write_table(pa.table({"uid": uids}), keep)
    reshard(str(folder / "00000.tar"), [keep], tmp_path / "out", samples_per_shard=10)
    written = [s for tar in list_shards(tmp_path / "out") for s in iter_shard(tar)]
    assert sorted(s["json"]["uid"] for s in written) == [uids[0], uids[3]]
    for tar in list_shards(tmp_path / "out"):
        with tarfile.open(tar) as t:
            assert not [n for n in t.getnames() if n.startswith("/") or ".." in n.split("/")]
    assert_nothing_escaped(tmp_path, outside)


def test_training_stream_counts_them_as_bad_samples(hostile, tmp_path: Path) -> None:
    folder, outside, _ = hostile
    bundle = build_model(load_config(TINY).model)
    cfg = load_config(TINY, ["data.workers=0"]).data
    source = WebDatasetSource(str(folder / "00000.tar"), cfg, "eval", 0, 1, 0, 1, bundle, torch.device("cpu"))
    keys = []
    try:
        while True:
            keys += source.next_batch_with_info()[2]["keys"]
    except StopIteration:
        pass
    assert keys == ["000000", "000003"]
    assert Counter(source.skipped_by_reason()) == Counter({UNSAFE_MEMBER: 2})
    source.close()
    assert_nothing_escaped(tmp_path, outside)
