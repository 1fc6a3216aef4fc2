"""``data-tools eval-set``: ImageFolder trees and caption tables become eval sets that the webdataset package
reads with clip_benchmark's pattern (``test/{0..N-1}.tar`` with N from ``nshards.txt``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image

from data_tools.cli import main


def clip_benchmark_samples(root: Path, target: str) -> list[tuple]:
    """What clip_benchmark's build_wds_dataset reads: ``{0..N-1}.tar`` from ``test/nshards.txt``."""
    n = int((root / "test" / "nshards.txt").read_text())
    urls = f"{root}/test/{{0..{n - 1}}}.tar"
    with wds.WebDataset(urls, shardshuffle=False).to_tuple("__key__", "webp;png;jpg;jpeg", target) as d:
        return list(d)


def write_image(path: Path, seed: int, fmt: str | None = None) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path.read_bytes()


def test_image_folder_becomes_a_classification_set(tmp_path, capsys):
    tree = tmp_path / "tree"
    files = {}
    for c, name in enumerate(["zebra", "ant", "moth"]):  # classes in sorted order: ant 0, moth 1, zebra 2
        for i in range(c + 1):
            files[(name, i)] = write_image(tree / name / f"{i}.png", 10 * c + i)
    write_image(tree / "moth" / "odd.bmp", 99, "BMP")  # not a clip_benchmark format: stored as PNG
    out = tmp_path / "set"
    assert main(["eval-set", "--input", str(tree), "--output", str(out), "--samples-per-shard", "2"]) == 0
    assert "zeroshot_classification, 4 shards, 7 images" in capsys.readouterr().out
    assert (out / "classnames.txt").read_text().splitlines() == ["ant", "moth", "zebra"]
    assert (out / "zeroshot_classification_templates.txt").read_text().splitlines() == ["a photo of a {c}."]
    assert not (out / "dataset_type.txt").exists()
    samples = clip_benchmark_samples(out, "cls")
    assert [key for key, _, _ in samples] == [f"s{i:07d}" for i in range(7)]
    labels = [int(label) for _, _, label in samples]
    assert labels == [0, 0, 1, 1, 1, 1, 2]  # ant/0,1.png; moth/0,1,2.png, odd.bmp; zebra/0.png
    assert samples[0][1] == files[("ant", 0)] and samples[6][1] == files[("zebra", 0)]  # bytes kept
    assert Image.open(tmp_path / "tree" / "moth" / "odd.bmp").tobytes() == _decoded(samples[5][1])
    assert not list(out.rglob("*.tmp"))


def _decoded(data: bytes) -> bytes:
    import io

    return Image.open(io.BytesIO(data)).tobytes()


def test_imagenet_wordnet_tree_gets_open_clip_names_and_prompts(tmp_path):
    tree = tmp_path / "val"
    wnids = [f"n{i:08d}" for i in range(1000)]
    for wnid in wnids:
        (tree / wnid).mkdir(parents=True)
    write_image(tree / wnids[0] / "a.JPEG", 1, "JPEG")
    write_image(tree / wnids[999] / "b.JPEG", 2, "JPEG")
    out = tmp_path / "imagenet"
    assert main(["eval-set", "--input", str(tree), "--output", str(out)]) == 0
    assert (out / "classnames.txt").read_text().splitlines() == list(IMAGENET_CLASSNAMES)
    templates = (out / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert templates == [t("{c}") for t in OPENAI_IMAGENET_TEMPLATES] and len(templates) == 80
    assert [int(label) for _, _, label in clip_benchmark_samples(out, "cls")] == [0, 999]


def test_caption_tables_become_retrieval_sets(tmp_path):
    images = [write_image(tmp_path / "img" / f"{i}.jpg", i, "JPEG") for i in range(3)]
    rows = [
        ("img/0.jpg", "a cat"),
        ("img/1.jpg", "a dog\na hound"),
        ("img/0.jpg", "a kitten"),
        ("img/2.jpg", "a fox"),
    ]
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("filepath", "caption"), *rows])
    pq.write_table(
        pa.table({"image": [r[0] for r in rows], "text": [r[1] for r in rows]}), tmp_path / "c.parquet"
    )
    expected = [(images[0], "a cat\na kitten"), (images[1], "a dog\na hound"), (images[2], "a fox")]
    for table, flags in (("captions.csv", []), ("c.parquet", ["--task", "retrieval"])):
        out = tmp_path / f"set-{table}"
        args = [
            "eval-set",
            "--input",
            str(tmp_path / table),
            "--output",
            str(out),
            "--samples-per-shard",
            "2",
        ]
        assert main(args + flags) == 0
        assert (out / "dataset_type.txt").read_text().strip() == "retrieval"
        assert (out / "test" / "nshards.txt").read_text().strip() == "2"
        got = [(image, text.decode()) for _, image, text in clip_benchmark_samples(out, "txt")]
        assert got == expected


def test_rerun_skips_finished_shards_and_errors_are_one_line(tmp_path, capsys):
    tree = tmp_path / "tree"
    for i in range(3):
        write_image(tree / "a" / f"{i}.png", i)
    out = tmp_path / "set"
    args = ["eval-set", "--input", str(tree), "--output", str(out), "--samples-per-shard", "1"]
    assert main(args) == 0
    (out / "test" / "nshards.txt").unlink()  # as if stopped before the end
    first = (out / "test" / "1.tar").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert (out / "test" / "1.tar").stat().st_mtime_ns == first  # finished shards are not rewritten
    assert (out / "test" / "nshards.txt").read_text().strip() == "3"

    (tmp_path / "bad.csv").write_text("path,caption\nmissing.jpg,a ghost\n")
    assert main(["eval-set", "--input", str(tmp_path / "bad.csv"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "image not found" in err and "missing.jpg" in err
    assert main(["eval-set", "--input", str(tree), "--output", str(out), "--samples-per-shard", "2"]) == 2
    assert "other settings (samples_per_shard 1 -> 2)" in capsys.readouterr().err
