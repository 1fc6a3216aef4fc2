"""``data-tools reshard``: keep lists (upsampling, intersection) into new shards; deterministic, resumable."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.cli import main
from data_tools.reshard import reshard, source_positions
from data_tools.runner import RunnerOptions
from webshards.demo_data import write_demo_data
from webshards.layout import iter_shard, key_for, list_shards, read_sizes

SPEC = "{00000..00003}.tar"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 demo samples in 4 input shards of 10."""
    output = tmp_path_factory.mktemp("demo")
    write_demo_data(output, samples=40, eval_samples=0, image_size=16, samples_per_shard=10, workers=1)
    return output / "train"


@pytest.fixture(scope="module")
def originals(shards: Path) -> dict[str, dict]:
    return {s["json"]["uid"]: s for tar in list_shards(shards) for s in iter_shard(tar)}


def write_keep(path: Path, uids: list[str]) -> Path:
    pq.write_table(pa.table({"uid": uids}), path)
    return path


def read_output(folder: Path) -> list[dict]:
    return [sample for tar in list_shards(folder) for sample in iter_shard(tar)]


def test_keep_list_with_upsampling(shards: Path, originals: dict[str, dict], tmp_path: Path) -> None:
    uids = sorted(originals)
    keep = uids[:12] + [uids[0]] * 2 + [uids[5]] + ["f" * 32]  # uids[0] x3, uids[5] x2, one unknown uid
    summary = reshard(str(shards / SPEC), [write_keep(tmp_path / "keep.parquet", keep)], tmp_path / "out", 5)
    assert summary.ok() and summary.samples == 15
    samples = read_output(tmp_path / "out")
    assert Counter(s["json"]["uid"] for s in samples) == Counter(keep) - Counter({"f" * 32: 1})
    assert read_sizes(tmp_path / "out") == {"00000.tar": 5, "00001.tar": 5, "00002.tar": 5}
    for index, sample in enumerate(samples):
        original = originals[sample["json"]["uid"]]
        assert sample["__key__"] == key_for(index // 5, index % 5) == sample["json"]["key"]
        assert sample["jpg"] == original["jpg"] and sample["txt"] == original["txt"]
        kept_fields = {k: v for k, v in original["json"].items() if k != "key"}
        assert {k: v for k, v in sample["json"].items() if k != "key"} == kept_fields
    assert (
        sum(row["status"] == "success" for row in pq.read_table(tmp_path / "out/00000.parquet").to_pylist())
        == 5
    )


def test_intersection_takes_the_smallest_count(
    shards: Path, originals: dict[str, dict], tmp_path: Path
) -> None:
    uids = sorted(originals)
    first = write_keep(tmp_path / "a.parquet", uids[:20] + [uids[1]] * 3 + [uids[2]])
    second = write_keep(tmp_path / "b.parquet", uids[10:30] + [uids[1]] + [uids[10]] * 2)
    args = ["reshard", "--shards", str(shards / SPEC), "--keep", str(first), "--keep", str(second)]
    assert main([*args, "--output", str(tmp_path / "out"), "--samples-per-shard", "4"]) == 0
    got = Counter(s["json"]["uid"] for s in read_output(tmp_path / "out"))
    expected = Counter(uids[:20] + [uids[1]] * 3 + [uids[2]]) & Counter(
        uids[10:30] + [uids[1]] + [uids[10]] * 2
    )
    assert got == expected and got[uids[1]] == 1 and got[uids[10]] == 1 and uids[2] not in got
    assert sum(got.values()) == 11  # uids[10:20] and uids[1]


def test_shuffle_is_seeded_and_independent_of_workers(shards: Path, originals: dict, tmp_path: Path) -> None:
    keep = write_keep(tmp_path / "keep.parquet", sorted(originals)[:30])
    options = {"samples_per_shard": 7, "shuffle_buffer": 8, "seed": 3}
    reshard(str(shards / SPEC), [keep], tmp_path / "one", **options)
    reshard(str(shards / SPEC), [keep], tmp_path / "two", **options, options=RunnerOptions(workers=2))
    reshard(str(shards / SPEC), [keep], tmp_path / "plain", samples_per_shard=7)
    for tar in list_shards(tmp_path / "one"):
        assert tar.read_bytes() == (tmp_path / "two" / tar.name).read_bytes()
    shuffled = [s["json"]["uid"] for s in read_output(tmp_path / "one")]
    in_order = [s["json"]["uid"] for s in read_output(tmp_path / "plain")]
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order


def test_rerun_after_a_lost_shard_writes_the_same_bytes(
    shards: Path, originals: dict, tmp_path: Path
) -> None:
    keep = write_keep(tmp_path / "keep.parquet", sorted(originals)[5:35] * 2)
    options = {"samples_per_shard": 9, "shuffle_buffer": 5, "seed": 1}
    reshard(str(shards / SPEC), [keep], tmp_path / "out", **options)
    before = {tar.name: tar.read_bytes() for tar in list_shards(tmp_path / "out")}
    (tmp_path / "out" / "00002_stats.json").unlink()  # as if killed before shard 2 was complete
    (tmp_path / "out" / "00002.tar").unlink()
    summary = reshard(str(shards / SPEC), [keep], tmp_path / "out", **options)
    assert summary.done == ["00002"] and len(summary.skipped) == len(before) - 1
    assert before == {tar.name: tar.read_bytes() for tar in list_shards(tmp_path / "out")}
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="seed"):
        reshard(str(shards / SPEC), [keep], tmp_path / "out", **{**options, "seed": 2})


def test_source_positions_permute_each_window() -> None:
    positions = source_positions(0, 23, 23, 5, seed=0)
    assert sorted(positions) == list(range(23))
    assert all(sorted(positions[i : i + 5]) == list(range(i, min(i + 5, 23))) for i in range(0, 23, 5))
    assert source_positions(7, 13, 23, 5, seed=0) == positions[7:13]


def test_datacomp_npy_keep_list(shards: Path, originals: dict, tmp_path: Path) -> None:
    uids = sorted(originals)[:6]
    pairs = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in uids], dtype=[("a", "<u8"), ("b", "<u8")])
    np.save(tmp_path / "keep.npy", pairs)
    reshard(str(shards / SPEC), [tmp_path / "keep.npy"], tmp_path / "out")
    assert sorted(s["json"]["uid"] for s in read_output(tmp_path / "out")) == uids


def test_bad_inputs_are_one_line(shards: Path, tmp_path: Path, capsys) -> None:
    keep = write_keep(tmp_path / "keep.parquet", ["0" * 32])
    missing = ["reshard", "--shards", str(tmp_path / "{00000..00001}.tar"), "--keep", str(keep)]
    assert main([*missing, "--output", str(tmp_path / "o")]) == 2
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "nouid.parquet")
    no_uid = ["reshard", "--shards", str(shards / SPEC), "--keep", str(tmp_path / "nouid.parquet")]
    assert main([*no_uid, "--output", str(tmp_path / "o")]) == 2
    assert main(["reshard", "--shards", "x", "--keep", "y", "--output", "o", "--shuffle-buffer", "-1"]) == 2
    assert [len(line) > 0 for line in capsys.readouterr().err.strip().splitlines()] == [True] * 3
