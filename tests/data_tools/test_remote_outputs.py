"""Every stage with URLs (a moto S3 server): build with ``--output s3://…``, embed to s3, filter, all three
dedup methods and reshard reading from and writing to s3, stats reading from s3. The objects equal a local run's files (so no
scratch or spill file is left on s3), every shard's marker is uploaded after its data, a rerun skips what is
there, a rank split polls its phase markers on s3, and a URL nothing can reach is one line."""

from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import lineage_identity, moto_s3, write_image_folder

import data_tools.phases
import webshards.outputs
from data_tools.build import build
from data_tools.cli import main
from data_tools.images import ImageConfig
from data_tools.reshard import reshard
from data_tools.stats import gather

TIMING_KEYS = {"start_time", "end_time", "duration"}
"""_stats.json records when its shard was written: the one thing two runs legitimately differ in."""
VARYING_KEYS = {
    "_stats.json": TIMING_KEYS,
    "report.json": {"seconds", "hash_seconds"},  # dedup's timings
    "_summary.json": {"keep_list"},  # filter's summary names the keep list's own path
}


def comparable(name: str, data: bytes) -> bytes | dict:
    if name.endswith("lineage.json"):  # names its locations and times: compared by what the stage did
        return lineage_identity(data)
    for suffix, varying in VARYING_KEYS.items():
        if name.endswith(suffix):
            return {k: v for k, v in json.loads(data).items() if k not in varying}
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
        bucket, key = remote.split("/", 1)
        for before in files_before_marker(key):
            size = self._client.head_object(Bucket=bucket, Key=before)["ContentLength"]
            assert size > 0, f"{before} empty when its marker {key} is written"
        self._seen.append(remote.rsplit("/", 1)[-1])
        self._fs.put_file(local, remote, **kwargs)


def files_before_marker(key: str) -> list[str]:
    """The objects that must be complete when the marker ``key`` is uploaded: a shard's tar and parquet
    before its ``_stats.json``; a shard's image and text embeddings before its ``metadata_i.parquet``."""
    if key.endswith("_stats.json"):
        stem = key.removesuffix("_stats.json")
        return [stem + ".tar", stem + ".parquet"]
    folder, _, name = key.rpartition("/")
    if folder.endswith("metadata") and name.startswith("metadata_"):
        base, index = folder.removesuffix("metadata"), name.removeprefix("metadata_").removesuffix(".parquet")
        return [f"{base}img_emb/img_emb_{index}.npy", f"{base}text_emb/text_emb_{index}.npy"]
    return []


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


@pytest.fixture(scope="module")
def dup_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three local shards of 7 images and 2 exact copies of two of them (other captions): a shard spec
    with duplicates for every dedup method."""
    root = tmp_path_factory.mktemp("dup-shards")
    write_image_folder(root / "images", 7, corrupt=False)
    for copy, source in ((7, 1), (8, 4)):
        shutil.copy(root / "images" / f"img{source:03d}.png", root / "images" / f"img{copy:03d}.png")
        (root / "images" / f"img{copy:03d}.txt").write_text(f"a copy of image {source}")
    build(root / "images", root / "built", samples_per_shard=3, image=ImageConfig(image_size=32))
    return str(root / "built" / "{00000..00002}.tar")


EMBED = ["embed", "--model", "tiny-clip", "--batch-size", "4"]


@pytest.fixture(scope="module")
def embedded(dup_shards: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shards embedded into a local folder (tiny-clip, random weights: the same model in the whole
    process, as embed loads it once)."""
    out = tmp_path_factory.mktemp("embedded")
    assert main([*EMBED, "--shards", dup_shards, "--output", str(out)]) == 0
    return out


def upload(client, folder: Path, prefix: str, leave_out: str = "") -> None:
    """Every file under ``folder`` (but those named ``*leave_out``) put under ``prefix/`` of the test bucket
    with boto3."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if leave_out and path.name.endswith(leave_out):
            continue
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        client.put_object(Bucket="bucket", Key=key, Body=path.read_bytes())


def test_embed_to_s3_equals_local_and_writes_metadata_last(s3, dup_shards: str, embedded: Path) -> None:
    client, seen = s3
    assert main([*EMBED, "--shards", dup_shards, "--output", "s3://bucket/embedded"]) == 0
    assert bucket_files(client, "embedded") == local_files(embedded)
    assert seen == [
        name for i in range(3) for name in (f"img_emb_{i}.npy", f"text_emb_{i}.npy", f"metadata_{i}.parquet")
    ]
    seen.clear()
    assert main([*EMBED, "--shards", dup_shards, "--output", "s3://bucket/embedded/"]) == 0
    assert seen == []  # every shard complete: nothing uploaded again


def test_filter_from_and_to_s3_equals_local_and_leaves_no_scratch(tmp_path: Path, s3, embedded: Path) -> None:
    client, _ = s3
    upload(client, embedded, "emb")
    args = ["filter", "--keep-fraction", "0.5", "--format", "datacomp"]
    local = tmp_path / "local" / "keep.parquet"
    assert main([*args, "--embeddings", str(embedded), "--output", str(local)]) == 0
    assert (
        main([*args, "--embeddings", "s3://bucket/emb", "--output", "s3://bucket/filtered/keep.parquet"]) == 0
    )
    files = bucket_files(client, "filtered")
    assert sorted(files) == [
        "keep.npy",
        "keep.parquet",
        "keep_lineage.json",
        "keep_scores.png",
        "keep_summary.json",
    ]  # no keep_work/
    assert files == local_files(local.parent)
    kept = pq.read_table(io.BytesIO(files["keep.parquet"]))["uid"].to_pylist()
    assert 0 < len(kept) < 9 and files["keep_summary.json"]["kept"] == len(kept)


@pytest.mark.parametrize("method", ["exact", "perceptual", "semantic"])
def test_dedup_to_s3_equals_local_and_leaves_no_scratch(
    tmp_path: Path, s3, dup_shards: str, embedded: Path, method: str
) -> None:
    client, _ = s3
    upload(client, embedded, "emb")
    source = (["--threshold", "1e-5", "--embeddings"], [str(embedded), "s3://bucket/emb"])
    if method != "semantic":  # random tiny-clip weights: distinct images are close, only copies within 1e-5
        source = (["--shards"], [dup_shards, dup_shards])
    args = ["dedup", "--method", method, "--partitions", "3", *source[0]]
    assert main([*args, source[1][0], "--output", str(tmp_path / "local")]) == 0
    assert main([*args, source[1][1], "--output", f"s3://bucket/dedup-{method}"]) == 0
    files = bucket_files(client, f"dedup-{method}")
    assert files == local_files(tmp_path / "local")
    assert not [name for name in files if name.startswith(("partitions/", "semantic-work/"))]
    assert files["report.json"]["groups"] == 2 and files["report.json"]["removed"] == 2  # the two copies


def test_rank_split_polls_markers_on_s3(tmp_path: Path, s3, embedded: Path, monkeypatch) -> None:
    """Two ranks (threads) of semantic dedup with the embeddings, spill files and output on s3: each waits
    for the other's phase markers there; rank 0 merges the same files as one local run."""
    client, _ = s3
    upload(client, embedded, "emb")
    monkeypatch.setattr(data_tools.phases, "POLL_SECONDS", 0.05)
    args = ["dedup", "--method", "semantic", "--threshold", "1e-5", "--partitions", "3", "--embeddings"]
    assert main([*args, str(embedded), "--output", str(tmp_path / "local")]) == 0
    codes = [None, None]

    def rank(r: int) -> None:
        split = ["--rank", str(r), "--world", "2", "--phase-timeout", "60"]
        codes[r] = main([*args, "s3://bucket/emb", "--output", "s3://bucket/split", *split])

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert codes == [0, 0]
    assert bucket_files(client, "split") == local_files(tmp_path / "local")


@pytest.mark.parametrize(
    "url, reason",
    [("nope://bucket/emb", "Protocol not known: nope"), ("wandb://bucket/emb", "Install wandbfs")],
)
def test_unreachable_url_is_one_line(tmp_path: Path, capsys, dup_shards: str, url: str, reason: str) -> None:
    """An unknown protocol or one whose fsspec package is missing, as an input and as an output."""
    for argv in (
        ["filter", "--embeddings", url, "--min-score", "0", "--output", str(tmp_path / "keep.parquet")],
        ["dedup", "--method", "exact", "--shards", dup_shards, "--output", url],
    ):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert (
            len(err) == 1 and err[0].startswith(f"data-tools: error: cannot use {url}") and reason in err[0]
        ), err


def test_npy_rows_reads_only_the_rows_range_of_a_remote_file(s3, monkeypatch) -> None:
    """The shuffle's partition read (``outputs.npy_rows``) on s3: the rows equal numpy's slice of the array,
        and the bytes fetched are the header (under 1 KiB) and that range, each plus fsspec's 64 KiB read-ahead,
    not the 3.2 MB file."""
    client, _ = s3
    records = np.zeros(200_000, dtype=[("index", "<i8"), ("vec", "<f2", (4,))])
    records["index"] = np.arange(len(records))
    records["vec"] = np.arange(len(records) * 4).reshape(-1, 4) % 1000
    buffer = io.BytesIO()
    np.save(buffer, records)
    client.put_object(Bucket="bucket", Key="npy/records.npy", Body=buffer.getvalue())
    opened = []
    wrap = webshards.outputs.url_to_fs

    def recording(url: str):
        fs, path = wrap(url)
        real_open = fs.open

        class Recording:
            def __getattr__(self, name: str):
                return getattr(fs, name)

            def open(self, *args, **kwargs):
                f = real_open(*args, **kwargs)
                opened.append(f.cache)  # the file drops its cache when closed; its byte count stays
                return f

        return Recording(), path

    monkeypatch.setattr(webshards.outputs, "url_to_fs", recording)
    url = "s3://bucket/npy/records.npy"
    for start, stop in ((0, 0), (0, 5), (123_456, 123_556), (199_990, 200_000)):
        rows = webshards.outputs.npy_rows(url, start, stop)
        assert rows.dtype == records.dtype and np.array_equal(rows, records[start:stop])
        fetched = opened[-1].total_requested_bytes
        assert fetched <= 2 * 65536 + 1024 + (stop - start) * records.itemsize < len(buffer.getvalue()) // 8
    assert webshards.outputs.npy_shape(url) == (200_000,)


RESHARD = ["reshard", "--samples-per-shard", "2", "--shuffle-buffer", "3", "--seed", "1"]
SPEC = "{00000..00002}.tar"


def filtered_keep_lists(client, local: Path, embedded: Path, remote: str) -> None:
    """``keep.parquet`` and ``keep.npy`` from one filter run on local embeddings (into ``local``) and one on
    the embeddings uploaded to s3 (into the URL ``remote``)."""
    upload(client, embedded, "emb")
    args = ["filter", "--keep-fraction", "0.7", "--format", "datacomp", "--embeddings"]
    assert main([*args, str(embedded), "--output", str(local / "keep.parquet")]) == 0
    assert main([*args, "s3://bucket/emb", "--output", f"{remote}/keep.parquet"]) == 0


def reshard_argv(shards: str, keeps: list[str], output: str) -> list[str]:
    return [
        *RESHARD,
        "--shards",
        shards,
        *[a for keep in keeps for a in ("--keep", keep)],
        "--output",
        output,
    ]


@pytest.mark.parametrize("prefix", ["with-parquets", "tars-only"])
def test_reshard_from_s3_shards_and_keep_lists_equals_local(
    tmp_path: Path, s3, dup_shards: str, embedded: Path, prefix: str
) -> None:
    """Shards, keep lists and output on s3 (the shards with their parquets, or tars only: then the kept
    samples are found by streaming the tars) write the same files as the all-local reshard; reshard.json
    records the URLs. The second run intersects a DataComp ``.npy`` on s3 with a local parquet list.
    (moto keeps its buckets for the whole session: each case has its own prefix.)"""
    client, _ = s3
    keep, remote = tmp_path / "keep", f"s3://bucket/{prefix}"
    filtered_keep_lists(client, keep, embedded, f"{remote}/keep")
    upload(
        client, Path(dup_shards).parent, f"{prefix}/shards", "" if prefix == "with-parquets" else ".parquet"
    )
    local_keeps = [[f"{keep}/keep.parquet"], [f"{keep}/keep.npy", f"{keep}/keep.parquet"]]
    remote_keeps = [[f"{remote}/keep/keep.parquet"], [f"{remote}/keep/keep.npy", f"{keep}/keep.parquet"]]
    for run, (local_keep, remote_keep) in enumerate(zip(local_keeps, remote_keeps)):
        assert main(reshard_argv(dup_shards, local_keep, str(tmp_path / f"local{run}"))) == 0
        assert main(reshard_argv(f"{remote}/shards/{SPEC}", remote_keep, f"{remote}/curated{run}")) == 0
        files = bucket_files(client, f"{prefix}/curated{run}")
        expected = local_files(tmp_path / f"local{run}")
        settings = json.loads(files.pop("reshard.json"))
        expected.pop("reshard.json")
        assert files == expected and {"00000.tar", "00002.tar", "sizes.json"} <= set(files)
        assert settings["shards"] == [f"{remote}/shards/0000{i}.tar" for i in range(3)]
        assert settings["keep"] == [remote_keep[0], *(str(Path(k).resolve()) for k in remote_keep[1:])]


def test_missing_s3_keep_list_or_shard_is_one_line(tmp_path: Path, s3, dup_shards: str, capsys) -> None:
    """A keep list or a shard not on s3 is a bad input (exit 2, as for a local one): one line naming the URL,
    and nothing written."""
    client, _ = s3
    upload(client, Path(dup_shards).parent, "shards")  # the same objects as another test's: no harm
    buffer = io.BytesIO()
    pq.write_table(pa.table({"uid": ["0" * 32]}), buffer)
    client.put_object(Bucket="bucket", Key="keep/keep.parquet", Body=buffer.getvalue())
    cases = [
        (
            f"s3://bucket/shards/{SPEC}",
            "s3://bucket/keep/nope.parquet",
            2,
            "keep list not found: s3://bucket/keep/nope.parquet",
        ),
        (
            "s3://bucket/shards/{00000..00003}.tar",
            "s3://bucket/keep/keep.parquet",
            2,
            "s3://bucket/shards/00003.tar (1 of 4)",
        ),
    ]
    for shards, keep, status, message in cases:
        capsys.readouterr()
        assert main(reshard_argv(shards, [keep], "s3://bucket/never")) == status
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("data-tools: error: ") and message in err[0], err
    assert bucket_files(client, "never") == {}
    with pytest.raises(ValueError, match="keep list not found: s3://bucket/keep/nope.parquet"):
        reshard(f"s3://bucket/shards/{SPEC}", ["s3://bucket/keep/nope.parquet"], tmp_path / "out")


def test_stats_of_s3_shards_and_embeddings_equals_local(
    tmp_path: Path, s3, dup_shards: str, embedded: Path, capsys
) -> None:
    """``stats`` of shards and embeddings on s3 prints the local report; shards without parquets are read
    from their tars, as locally; a missing shard is one line naming its URL."""
    client, _ = s3
    upload(client, Path(dup_shards).parent, "shards")
    upload(client, Path(dup_shards).parent, "bare", leave_out=".parquet")
    upload(client, embedded, "emb")
    printed = []
    for shards, emb in ((dup_shards, str(embedded)), (f"s3://bucket/shards/{SPEC}", "s3://bucket/emb/")):
        assert main(["stats", "--shards", shards, "--embeddings", emb]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and "clip_score" in printed[0] and "samples 9" in printed[0]
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in Path(dup_shards).parent.glob("*.tar"):
        shutil.copy(tar, bare / tar.name)
    assert gather(f"s3://bucket/bare/{SPEC}").to_dict() == gather(str(bare / SPEC)).to_dict()
    assert main(["stats", "--shards", "s3://bucket/shards/{00002..00003}.tar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["data-tools: error: shard not found: s3://bucket/shards/00003.tar"]
