"""``data-tools build``: folders and tables of paths/URLs to shards; failures recorded; resumable; nodes."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ROOT, serve_files, write_image_folder
from PIL import Image

from data_tools.cli import main
from data_tools.images import ImageConfig, process, resize
from webshards.layout import iter_shard, list_shards, read_sizes

IMAGES = 11  # + one corrupt file: 12 rows, 3 shards of 4
BUILD = ["--samples-per-shard", "4", "--image-size", "16"]
TIMING = ("start_time", "end_time", "duration")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images")
    write_image_folder(path, IMAGES)
    return path


@pytest.fixture(scope="module")
def reference(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("built")
    assert main(["build", "--input", str(folder), "--output", str(output), *BUILD, "--workers", "2"]) == 0
    return output


def assert_same_output(a: Path, b: Path) -> None:
    """Same files with the same bytes (``_stats.json`` equal apart from timing)."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith("_stats.json"):
            first, second = (json.loads((x / name).read_text()) for x in (a, b))
            assert {k: v for k, v in first.items() if k not in TIMING} == {
                k: v for k, v in second.items() if k not in TIMING
            }
        elif name not in (
            "build.json",
            "lineage.json",
        ):  # hold the input path, which differs between some runs
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_folder_to_shards(reference: Path) -> None:
    assert [p.name for p in list_shards(reference)] == ["00000.tar", "00001.tar", "00002.tar"]
    assert read_sizes(reference) == {"00000.tar": 3, "00001.tar": 4, "00002.tar": 4}  # broken.jpg sorts first
    assert json.loads((reference / "sizes.json").read_text()) == read_sizes(reference)
    samples = [s for tar in list_shards(reference) for s in iter_shard(tar)]
    assert len(samples) == IMAGES
    for sample in samples:
        meta = sample["json"]
        assert sample["__key__"] == meta["key"] and len(meta["uid"]) == 32
        assert meta["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()
        assert sample["txt"] == meta["caption"] and meta["path"].startswith("img")
        assert min(Image.open(io.BytesIO(sample["jpg"])).size) == 16  # keep_ratio: smaller side
        assert (meta["width"], meta["height"]) == Image.open(io.BytesIO(sample["jpg"])).size
        number = int(meta["path"][3:6])
        assert (meta["original_width"], meta["original_height"]) == (24 + 2 * number, 24 + number)
        assert len(sample["txt"].split()) == number + 1


def test_corrupt_image_is_recorded_and_the_rest_written(reference: Path) -> None:
    rows = [row for i in range(3) for row in pq.read_table(reference / f"0000{i}.parquet").to_pylist()]
    assert len(rows) == IMAGES + 1
    broken = [row for row in rows if row["path"] == "broken.jpg"]
    assert len(broken) == 1 and broken[0]["status"] == "failed_to_decode" and broken[0]["error_message"]
    assert broken[0]["caption"] == "a broken image" and len(broken[0]["uid"]) == 32
    stats = json.loads((reference / "00000_stats.json").read_text())  # broken.jpg sorts first
    assert (stats["count"], stats["successes"], stats["failed_to_decode"]) == (4, 3, 1)


def test_readable_by_webdataset(reference: Path) -> None:
    import webdataset as wds

    dataset = wds.WebDataset(str(reference / "{00000..00002}.tar"), shardshuffle=False).decode("pil")
    samples = list(dataset)
    assert len(samples) == IMAGES
    assert all(min(s["jpg"].size) == 16 and isinstance(s["json"], dict) for s in samples)


def test_two_nodes_make_the_single_run_output(folder: Path, reference: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "data_tools.cli", "build", "--input", str(folder), "--output", str(tmp_path)]
    nodes = [subprocess.Popen([*cmd, *BUILD, "--rank", str(r), "--world", "2"], cwd=ROOT) for r in (0, 1)]
    assert [node.wait(timeout=60) for node in nodes] == [0, 0]
    if not (tmp_path / "sizes.json").exists():  # both nodes finished at once: neither saw all complete
        assert main(["build", "--input", str(folder), "--output", str(tmp_path), *BUILD]) == 0
    assert_same_output(reference, tmp_path)


def test_killed_build_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    images = {f"{i}.png": _png(i) for i in range(24)}
    with serve_files(images, delay=0.04) as url:  # slow downloads: a kill lands mid-way
        table = _write_csv(tmp_path / "pairs.csv", [(f"{url}/{name}", f"image {name}") for name in images])
        args = ["build", "--input", str(table), *BUILD, "--threads", "1"]
        killed = tmp_path / "killed"
        process = subprocess.Popen(
            [sys.executable, "-m", "data_tools.cli", *args, "--output", str(killed)], cwd=ROOT
        )
        _wait_for(lambda: any(killed.glob("*_stats.json")) or process.poll() is not None)
        process.send_signal(signal.SIGKILL)
        process.wait()
        complete = len(list(killed.glob("*_stats.json")))
        assert 0 < complete < 6, "the kill should land mid-way"
        for final in [*killed.glob("*.tar"), *killed.glob("*.parquet")]:  # final names only once complete
            assert final.with_name(f"{final.stem}_stats.json").exists()
        assert main([*args, "--output", str(killed), "--threads", "8"]) == 0
        assert main([*args, "--output", str(tmp_path / "whole"), "--threads", "8", "--workers", "2"]) == 0
    assert not [p for p in killed.iterdir() if p.name.startswith(".")]  # no temp files left
    assert_same_output(tmp_path / "whole", killed)


def test_url_input_with_a_404(tmp_path: Path) -> None:
    with serve_files({"a.png": _png(1), "b.png": _png(2)}) as url:
        rows = [(f"{url}/a.png", "first"), (f"{url}/missing.png", "gone"), (f"{url}/b.png", "second")]
        table = _write_csv(tmp_path / "urls.csv", rows)
        assert (
            main(["build", "--input", str(table), "--output", str(tmp_path / "out"), "--retries", "0"]) == 0
        )
    rows = pq.read_table(tmp_path / "out" / "00000.parquet").to_pylist()
    assert [row["status"] for row in rows] == ["success", "failed_to_download", "success"]
    assert rows[1]["url"].endswith("/missing.png") and "not found" in rows[1]["error_message"]
    samples = list(iter_shard(tmp_path / "out" / "00000.tar"))
    assert [s["json"]["url"] for s in samples] == [rows[0]["url"], rows[2]["url"]]


def test_table_formats_agree(folder: Path, tmp_path: Path) -> None:
    pairs = [(f"img{i:03d}.png", f"caption {i}") for i in range(3)] + [("nope.png", "missing")]
    tables = {
        "csv": _write_csv(tmp_path / "t.csv", pairs, header=("image", "text")),
        "tsv": _write_csv(tmp_path / "t.tsv", pairs, header=("filepath", "title")),
        "jsonl": tmp_path / "t.jsonl",
        "parquet": tmp_path / "t.parquet",
    }
    tables["jsonl"].write_text("".join(json.dumps({"path": p, "caption": c}) + "\n" for p, c in pairs))
    pq.write_table(
        pa.table({"file_name": [p for p, _ in pairs], "alt": [c for _, c in pairs]}), tables["parquet"]
    )
    for image in pairs[:3]:
        (tmp_path / image[0]).write_bytes((folder / image[0]).read_bytes())
    outputs = {}
    for kind, table in tables.items():
        columns = ["--url-col", "file_name", "--caption-col", "alt"] if kind == "parquet" else []
        assert main(["build", "--input", str(table), "--output", str(tmp_path / kind), *columns]) == 0
        outputs[kind] = pq.read_table(tmp_path / kind / "00000.parquet").to_pylist()
    assert [row["status"] for row in outputs["csv"]] == ["success"] * 3 + ["failed_to_download"]
    for rows in outputs.values():  # same sources and captions: same uids and stored bytes
        assert [(r["uid"], r["sha256"], r["path"]) for r in rows] == [
            (r["uid"], r["sha256"], r["path"]) for r in outputs["csv"]
        ]


def test_captions_table_in_a_folder(folder: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").write_bytes((folder / "img000.png").read_bytes())
    (images / "captions.csv").write_text("file,caption\nx.png,a captioned picture\n")
    assert main(["build", "--input", str(images), "--output", str(tmp_path / "out")]) == 0
    (sample,) = iter_shard(tmp_path / "out" / "00000.tar")
    assert sample["txt"] == "a captioned picture" and sample["json"]["path"] == "x.png"


def test_a_list_cell_is_several_captions_and_the_separator_is_a_flag(folder: Path, tmp_path: Path) -> None:
    """A parquet list cell: KEY.json `captions` holds the list, KEY.txt and `caption` them one per line (as
    clip_benchmark's retrieval sets); a `;`-separated CSV reads with `--separator ';'`."""
    (tmp_path / "x.png").write_bytes((folder / "img000.png").read_bytes())
    table = pa.table({"path": ["x.png", "x.png"], "caption": [["one", "two"], []]})
    pq.write_table(table, tmp_path / "t.parquet")
    assert main(["build", "--input", str(tmp_path / "t.parquet"), "--output", str(tmp_path / "lists")]) == 0
    (sample,) = iter_shard(tmp_path / "lists" / "00000.tar")  # the empty list is a missing caption
    assert sample["json"]["captions"] == ["one", "two"]
    assert sample["txt"] == sample["json"]["caption"] == "one\ntwo"
    (tmp_path / "t.csv").write_text("path;caption\nx.png;a, b\n")
    semi = [
        "build",
        "--input",
        str(tmp_path / "t.csv"),
        "--output",
        str(tmp_path / "semi"),
        "--separator",
        ";",
    ]
    assert main(semi) == 0
    (sample,) = iter_shard(tmp_path / "semi" / "00000.tar")
    assert sample["txt"] == "a, b" and "captions" not in sample["json"]


def test_resize_modes() -> None:
    image = Image.new("RGB", (80, 40), (10, 200, 30))
    assert resize(image, 32, "keep_ratio").size == (64, 32)
    assert resize(image, 32, "center_crop").size == (32, 32)
    bordered = resize(image, 32, "border")
    assert bordered.size == (32, 32) and bordered.getpixel((0, 0)) == (255, 255, 255)
    assert resize(image, 32, "no").size == (80, 40)
    jpeg, png = io.BytesIO(), io.BytesIO()
    image.save(jpeg, format="JPEG")
    image.save(png, format="PNG")
    assert process(jpeg.getvalue(), ImageConfig(resize_mode="no"))[0] == jpeg.getvalue()  # bytes kept
    stored, width, height = process(png.getvalue(), ImageConfig(resize_mode="no"))
    assert stored[:3] == b"\xff\xd8\xff" and (width, height) == (80, 40)


def test_rerun_skips_and_other_settings_are_refused(folder: Path, reference: Path, capsys) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in reference.glob("*.tar")}
    assert main(["build", "--input", str(folder), "--output", str(reference), *BUILD]) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in reference.glob("*.tar")}
    assert main(["build", "--input", str(folder), "--output", str(reference), "--image-size", "8"]) == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra",
    [["--resize-mode", "squash"], ["--samples-per-shard", "0"], ["--max-aspect-ratio", "0.5"], ["--bogus"]],
)
def test_bad_arguments_are_one_line(extra: list[str], capsys) -> None:
    assert main(["build", "--input", ".", "--output", "o", *extra]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_missing_input_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["build", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20 + seed, 18), (seed * 10 % 255, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("url", "caption")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writerows([header, *rows])
    return path


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("policy", ["skip", "keep"])
def test_missing_captions_and_failures_are_counted_on_screen(tmp_path: Path, capsys, policy: str) -> None:
    """An image without a caption is its own status (skipped by default, or kept with an empty caption) and
    the console counts the input rows by status, failures included."""
    write_image_folder(tmp_path / "in", 3)  # + broken.jpg
    (tmp_path / "in/img001.txt").unlink()
    argv = ["build", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *BUILD]
    assert main([*argv, "--missing-caption", policy]) == 0
    out = capsys.readouterr().out.splitlines()
    stored = 2 if policy == "skip" else 3
    counts = f"{stored} success, 1 failed_to_decode" + (", 1 missing_caption" if policy == "skip" else "")
    assert out[-1] == f"build: 4 input rows: {counts}"
    rows = {row["path"]: row for row in pq.read_table(tmp_path / "out/00000.parquet").to_pylist()}
    expected = ("missing_caption", "") if policy == "skip" else ("success", "")
    assert (rows["img001.png"]["status"], rows["img001.png"]["caption"]) == expected
    stats = json.loads((tmp_path / "out/00000_stats.json").read_text())
    assert (stats["successes"], stats["missing_caption"]) == (stored, 1 if policy == "skip" else 0)
