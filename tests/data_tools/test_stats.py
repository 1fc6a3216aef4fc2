"""``data-tools stats``: counts by status, size / caption / clip-score distributions, the report files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import write_image_folder

from data_tools.build import build
from data_tools.cli import main
from data_tools.images import ImageConfig
from data_tools.stats import Histogram, gather

IMAGES = 5  # img00i.png is (24 + 2i) x (24 + i) with a caption of i + 1 words; plus broken.jpg


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_image_folder(folder, IMAGES)
    output = tmp_path_factory.mktemp("shards")
    build(folder, output, samples_per_shard=4, image=ImageConfig(image_size=16))
    return output


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings")
    (folder / "metadata").mkdir()
    for i, scores in enumerate(([0.1, 0.2, 0.3], [0.25, 0.4])):
        pq.write_table(pa.table({"clip_score": scores}), folder / "metadata" / f"metadata_{i}.parquet")
    return folder


def test_counts_and_distributions(shards: Path) -> None:
    info = gather(str(shards / "{00000..00001}.tar")).to_dict()
    assert (info["shards"], info["rows"], info["samples"]) == (2, IMAGES + 1, IMAGES)
    assert info["statuses"]["failed_to_decode"] == 1 and info["statuses"]["failed_to_download"] == 0
    widths = info["distributions"]["original_width"]
    assert (widths["count"], widths["min"], widths["p50"], widths["max"], widths["mean"]) == (
        5,
        24,
        28,
        32,
        28,
    )
    words = info["distributions"]["caption_words"]
    assert (words["min"], words["max"], words["mean"]) == (1, 5, 3)
    assert info["distributions"]["height"]["max"] == 16  # keep_ratio: the shorter side is 16


def test_histogram_percentiles() -> None:
    histogram = Histogram(0, 1, 101)
    histogram.add(np.arange(1, 101))
    histogram.add([np.nan])
    summary = histogram.summary()
    assert summary["count"] == 100 and (summary["p5"], summary["p50"], summary["p95"]) == (5, 50, 95)
    assert Histogram(0, 1, 4).summary() == {"count": 0}


def test_cli_report_with_clip_scores(shards: Path, embeddings: Path, tmp_path: Path, capsys, caplog) -> None:
    args = ["stats", "--shards", str(shards / "{00000..00001}.tar"), "--embeddings", str(embeddings)]
    assert main([*args, "--output", str(tmp_path / "report")]) == 0
    # the last progress line (a run this short logs no periodic one)
    assert re.search(
        r"^stats: 2/2 shards \(100%\), 6 rows, [\d.,]+ rows/s, elapsed \d+s, finished$",
        "\n".join(caplog.messages),
        re.M,
    )
    printed = capsys.readouterr().out
    assert "samples 5" in printed and "failed_to_decode" in printed and "clip_score" in printed
    report = json.loads((tmp_path / "report" / "stats.json").read_text())
    scores = report["distributions"]["clip_score"]
    assert (
        scores["count"] == 5
        and scores["mean"] == pytest.approx(0.25)
        and scores["p50"] == pytest.approx(0.25)
    )
    for name in ("original_width", "caption_words", "clip_score"):
        assert (tmp_path / "report" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_shard_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["stats", "--shards", str(tmp_path / "{00000..00001}.tar")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["stats"]) == 2
