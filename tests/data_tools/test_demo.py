"""The procedural demo set and the ``data-tools demo-data`` command."""

from __future__ import annotations

import collections
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from data_tools.cli import main
from webshards.demo_data import CLASSNAMES, write_demo_data
from webshards.layout import iter_shard, list_shards, read_sizes

SMALL = {"samples": 200, "eval_samples": 64, "image_size": 32, "samples_per_shard": 100}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("demo")
    write_demo_data(output, **SMALL, workers=2)
    return output


def samples_of(folder: Path) -> list[dict]:
    return [sample for tar in list_shards(folder) for sample in iter_shard(tar)]


def test_layout(demo: Path) -> None:
    assert read_sizes(demo / "train") == {"00000.tar": 100, "00001.tar": 100}
    assert read_sizes(demo / "eval") == {"00000.tar": 64}
    assert (demo / "train" / "sizes.json").exists() and (demo / "train" / "00001.parquet").exists()
    assert (demo / "classnames.txt").read_text().splitlines() == CLASSNAMES
    assert len(CLASSNAMES) == 32 and len(set(CLASSNAMES)) == 32
    templates = (demo / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert "a photo of a {c}." in templates and all("{c}" in t for t in templates)
    info = json.loads((demo / "demo.json").read_text())
    assert info["samples"] == 200 and info["seed"] == 0 and info["image_size"] == 32
    assert info["train"] == "train/{00000..00001}.tar"


def test_images_and_captions(demo: Path) -> None:
    for sample in samples_of(demo / "train"):
        assert Image.open(io.BytesIO(sample["jpg"])).size == (32, 32)
        colour, shape = CLASSNAMES[sample["json"]["label"]].split()
        assert colour in sample["txt"] and shape in sample["txt"]


def test_classes_are_balanced(demo: Path) -> None:
    counts = collections.Counter(s["json"]["label"] for s in samples_of(demo / "train"))
    assert len(counts) == 32 and max(counts.values()) - min(counts.values()) <= 1


def test_eval_is_labelled_and_held_out(demo: Path) -> None:
    eval_samples = samples_of(demo / "eval")
    assert len(eval_samples) == 64
    for sample in eval_samples:
        assert sample["cls"] == str(sample["json"]["label"]).encode()
        assert 0 <= sample["json"]["label"] < 32
    train_hashes = {s["json"]["sha256"] for s in samples_of(demo / "train")}
    assert not train_hashes & {s["json"]["sha256"] for s in eval_samples}


def test_eval_sets_in_clip_benchmark_layout(demo: Path) -> None:
    """The held-out images again, as clip_benchmark reads them: classification at the root (same images and
    labels as eval/), retrieval in retrieval/ with 3 distinct captions naming the image's class."""
    import webdataset as wds

    def read(root: Path, target: str) -> list[tuple]:
        n = int((root / "test" / "nshards.txt").read_text())
        urls = [str(root / "test" / f"{i}.tar") for i in range(n)]
        return list(wds.WebDataset(urls, shardshuffle=False).to_tuple("webp;png;jpg;jpeg", target))

    held_out = samples_of(demo / "eval")
    classification = read(demo, "cls")
    assert not (demo / "dataset_type.txt").exists() and (demo / "test" / "nshards.txt").read_text() == "4\n"
    assert [(image, int(label)) for image, label in classification] == [
        (s["jpg"], s["json"]["label"]) for s in held_out
    ]
    retrieval = read(demo / "retrieval", "txt")
    assert (demo / "retrieval" / "dataset_type.txt").read_text().strip() == "retrieval"
    assert [image for image, _ in retrieval] == [s["jpg"] for s in held_out]  # 64 < 256: all of them
    for (_, text), sample in zip(retrieval, held_out):
        captions = text.decode().splitlines()
        colour, shape = CLASSNAMES[sample["json"]["label"]].split()
        assert len(set(captions)) == 3 and all(colour in c and shape in c for c in captions)


def test_deterministic_for_any_worker_count(demo: Path, tmp_path: Path) -> None:
    write_demo_data(tmp_path, **SMALL, workers=1)
    for split in ("train", "eval"):
        ours, theirs = list_shards(tmp_path / split), list_shards(demo / split)
        assert [p.name for p in ours] == [p.name for p in theirs]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(ours, theirs))


def test_resume_skips_complete_shards(tmp_path: Path) -> None:
    first = write_demo_data(tmp_path, **SMALL, workers=1)
    assert (first["shards_written"], first["shards_skipped"]) == (3, 0)
    before = (tmp_path / "train" / "00001.tar").read_bytes()
    (tmp_path / "train" / "00001_stats.json").unlink()  # as if interrupted before the shard completed
    again = write_demo_data(tmp_path, **SMALL, workers=1)
    assert (again["shards_written"], again["shards_skipped"]) == (1, 2)
    assert (tmp_path / "train" / "00001.tar").read_bytes() == before


def test_other_settings_are_refused(demo: Path) -> None:
    with pytest.raises(ValueError, match="seed"):
        write_demo_data(demo, **SMALL, seed=1)


def test_cli_writes_demo_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo-data", "--output", str(tmp_path), "--samples", "40", "--eval-samples", "0"]
    assert main([*argv, "--image-size", "16", "--workers", "1"]) == 0
    assert read_sizes(tmp_path / "train") == {"00000.tar": 40}
    assert not (tmp_path / "eval").exists()
    assert "40 samples" in capsys.readouterr().out


def test_progress_lines_in_a_redirected_log(tmp_path: Path) -> None:
    """`data-tools demo-data 2> log`: no terminal, so plain lines with the total, rate and ETA, then a last one
    (``PROGRESS_EVERY=0``: a line per shard instead of every 30 s)."""
    argv = [sys.executable, "-m", "data_tools.cli", "demo-data", "--output", str(tmp_path / "data"), "--samples",
            "40", "--eval-samples", "0", "--image-size", "16", "--samples-per-shard", "20", "--workers", "1"]  # fmt: skip
    with (tmp_path / "log").open("w") as log:
        env = {**os.environ, "PROGRESS_EVERY": "0"}
        result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=log, env=env, timeout=120)
    lines = (tmp_path / "log").read_text().splitlines()
    assert result.returncode == 0, lines
    rest = r"[\d.,]+ img/s, elapsed \d+s"
    assert any(
        re.fullmatch(rf"demo-data: 1/2 shards \(50%\), 20 img, {rest}, ETA \d+s", line) for line in lines
    )
    assert any(
        re.fullmatch(rf"demo-data: 2/2 shards \(100%\), 40 img, {rest}, finished", line) for line in lines
    )
    assert "demo-data: 2 done, 0 skipped, 0 failed; 40 img in" in lines[-1]


def test_new_domain_draws_other_classes(demo: Path, tmp_path: Path) -> None:
    """`--domain new`: 16 classes of colours and shapes the default never shows, balanced, with their own
    uids and class names; the default set's demo.json does not mention a domain (its bytes are unchanged)."""
    argv = ["demo-data", "--output", str(tmp_path), "--samples", "64", "--eval-samples", "32"]
    assert main([*argv, "--image-size", "32", "--workers", "1", "--domain", "new"]) == 0
    classnames = (tmp_path / "classnames.txt").read_text().splitlines()
    assert len(classnames) == 16 and not set(classnames) & set(CLASSNAMES)
    assert {name.split()[1] for name in classnames} == {"pentagon", "hexagon", "diamond", "ring"}
    samples = samples_of(tmp_path / "train")
    counts = collections.Counter(sample["json"]["classname"] for sample in samples)
    assert set(counts) == set(classnames) and set(counts.values()) == {4}
    for sample in samples:
        colour, shape = sample["json"]["classname"].split()
        assert colour in sample["txt"] and shape in sample["txt"]
    default_uids = {sample["json"]["uid"] for sample in samples_of(demo / "train")}
    assert not {sample["json"]["uid"] for sample in samples} & default_uids
    assert json.loads((tmp_path / "demo.json").read_text())["domain"] == "new"
    assert "domain" not in json.loads((demo / "demo.json").read_text())


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert main(["demo-data", "--help"]) == 0
    assert "--samples-per-shard" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["demo-data", "--output", "x", "--samples", "-3"],
        ["demo-data", "--output", "x", "--samples", "abc"],
        ["demo-data", "--output", "x", "--no-such-flag"],
        ["demo-data"],
        [],
    ],
)
def test_cli_bad_arguments_fail_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert err.startswith("data-tools: error: ") and err.count("\n") == 1


def test_cli_runs_as_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "data_tools.cli", "demo-data", "--output", "x", "--seed", "-1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "data-tools: error: argument --seed: must be at least 0, got -1"
    ]
