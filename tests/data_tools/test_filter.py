"""data-tools filter: global thresholds, basic rules, keep-list formats, and a trained model's scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import trained_tiny_clip

from data_tools.cli import main
from data_tools.embeddings import METADATA_SCHEMA, embedding_files
from data_tools.filter import FilterConfig, datacomp_uids
from data_tools.filter_tasks import filter_job
from data_tools.phases import JobFailed
from data_tools.runner import RunnerOptions
from webshards.demo_data import CLASSNAMES
from webshards.layout import ShardWriter, iter_shard, make_uid


def write_metadata(folder: Path, index: int, rows: list[dict]) -> None:
    """A metadata parquet as embed writes it (absent columns are null)."""
    path = embedding_files(folder, index).metadata
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=METADATA_SCHEMA), path)


def kept_uids(path: Path) -> list[str]:
    return pq.read_table(path)["uid"].to_pylist()


def test_keep_fraction_threshold_is_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    scores = [rng.normal(0.2, 0.1, n).astype(np.float32) for n in (500, 1, 0, 1234)]
    for i, part in enumerate(scores):
        write_metadata(
            tmp_path, i, [{"uid": make_uid(f"{i}-{j}"), "clip_score": float(s)} for j, s in enumerate(part)]
        )
    everything = np.sort(np.concatenate(scores))[::-1]
    for fraction in (0.0, 0.001, 0.1, 0.3, 0.5, 0.999, 1.0):
        keep_list = tmp_path / f"keep-{fraction}" / "keep.parquet"
        summary = filter_job(tmp_path, keep_list, FilterConfig(keep_fraction=fraction), RunnerOptions())
        threshold = math.inf if summary["score_threshold"] is None else summary["score_threshold"]
        keep = round(fraction * len(everything))
        assert int((everything >= threshold).sum()) == keep
        if keep:
            assert threshold == everything[keep - 1]


def test_datacomp_uids_are_sorted_u8_pairs() -> None:
    uids = [
        "ffffffffffffffff0000000000000001",
        "00000000000000010000000000000002",
        "0123456789abcdef0011223344556677",
    ]
    pairs = datacomp_uids(uids)
    assert pairs.dtype == np.dtype("u8,u8")
    assert pairs.tolist() == [(1, 2), (0x0123456789ABCDEF, 0x0011223344556677), (2**64 - 1, 1)]


def test_basic_rules_summary_and_formats(tmp_path: Path) -> None:
    def row(name: str, caption: str, score: float, width: int, height: int, **extra: int) -> dict:
        return {
            "uid": make_uid(name),
            "caption": caption,
            "clip_score": score,
            "width": width,
            "height": height,
            **extra,
        }

    rows = [
        row("ok", "a red star on grass", 0.3, 300, 200),
        row("small", "a small red star", 0.3, 80, 150),
        row("long", "a long red star", 0.3, 900, 200),
        row("short", "star", 0.3, 300, 300),
        row("low", "a blue circle here", 0.1, 300, 300),
        # the source size counts when known: stored at 100 px but 400 px originally
        row("orig", "a big one here", 0.3, 100, 100, original_width=400, original_height=400),
    ]
    write_metadata(tmp_path / "emb", 0, rows)
    out = tmp_path / "keep.parquet"
    argv = ["filter", "--embeddings", str(tmp_path / "emb"), "--min-score", "0.2", "--output", str(out)]
    assert (
        main(
            [
                *argv,
                "--min-side",
                "100",
                "--max-aspect-ratio",
                "3",
                "--min-words",
                "3",
                "--format",
                "datacomp",
            ]
        )
        == 0
    )
    assert sorted(kept_uids(out)) == sorted([make_uid("ok"), make_uid("orig")])
    summary = json.loads((tmp_path / "keep_summary.json").read_text())
    assert summary["samples"] == 6 and summary["kept"] == 2
    assert summary["failed_rule"] == {"score": 1, "min_side": 1, "max_aspect_ratio": 1, "min_words": 1}
    assert (tmp_path / "keep_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.load(tmp_path / "keep.npy"), datacomp_uids(kept_uids(out)))


def test_sizes_come_from_the_shards_when_metadata_lacks_them(tmp_path: Path) -> None:
    from PIL import Image

    uids = []
    with ShardWriter(tmp_path / "shards", 0) as writer:
        for i, (w, h) in enumerate([(64, 64), (16, 64)]):
            Image.new("RGB", (w, h)).save(tmp_path / "img.png")
            record = writer.add(
                f"00000000{i}", (tmp_path / "img.png").read_bytes(), "x", {"path": f"{i}"}, ext="png"
            )
            uids.append(record["uid"])
    write_metadata(
        tmp_path / "emb",
        0,
        [{"key": f"00000000{i}", "uid": u, "clip_score": 0.5} for i, u in enumerate(uids)],
    )
    cfg = FilterConfig(min_side=32)
    with pytest.raises(JobFailed, match="--shards"):  # the CLI's exit status 1, with this line
        filter_job(tmp_path / "emb", tmp_path / "k.parquet", cfg, RunnerOptions())
    urls = [str(tmp_path / "shards/00000.tar")]
    filter_job(tmp_path / "emb", tmp_path / "k.parquet", cfg, RunnerOptions(), shard_urls=urls)
    assert kept_uids(tmp_path / "k.parquet") == uids[:1]


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["filter", "--embeddings", str(tmp_path), "--output", str(tmp_path / "k.parquet")]
    assert main([*base, "--min-score", "0.1", "--keep-fraction", "0.5"]) == 2
    assert main(base) == 2
    assert main([*base, "--keep-fraction", "1.5"]) == 2
    assert main([*base, "--keep-fraction", "0.5"]) == 2  # no metadata in the folder
    err = capsys.readouterr().err
    assert err.count("data-tools: error:") == 4 and "Traceback" not in err


@pytest.fixture(scope="module")
def planted(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    """Held-out demo samples, every fourth with the caption of another colour and shape; the planted uids."""
    out = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    planted = set()
    with ShardWriter(out, 0) as writer:
        for i, sample in enumerate(iter_shard(demo_data / "eval" / "00000.tar")):
            caption, meta = sample["txt"], {k: v for k, v in sample["json"].items() if k != "caption"}
            if i % 4 == 0:
                other = [c for c in CLASSNAMES if not set(c.split()) & set(caption.rstrip(".").split())]
                caption = f"a photo of a {other[rng.integers(len(other))]}."
                planted.add(meta["uid"])
            writer.add(sample["__key__"], sample["jpg"], caption, meta)
    return out, planted


def test_trained_model_scores_mismatched_captions_lower(
    demo_data: Path, planted: tuple[Path, set[str]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    shards, bad = planted
    root = tmp_path_factory.getbasetemp()
    run = trained_tiny_clip(root, f"{demo_data}/train/{{00000..00003}}.tar")
    emb, out = shards / "emb", shards / "keep.parquet"
    assert (
        main(["embed", "--shards", str(shards / "00000.tar"), "--model", str(run), "--output", str(emb)]) == 0
    )
    meta = pq.read_table(embedding_files(emb, 0).metadata)
    scores = dict(zip(meta["uid"].to_pylist(), meta["clip_score"].to_pylist()))
    low = np.array([scores[u] for u in bad])
    high = np.array([s for u, s in scores.items() if u not in bad])
    assert (low[:, None] < high[None, :]).mean() > 0.9  # a mismatched pair almost always scores lower
    fraction = 1 - len(bad) / len(scores)
    assert (
        main(["filter", "--embeddings", str(emb), "--keep-fraction", str(fraction), "--output", str(out)])
        == 0
    )
    removed = set(scores) - set(kept_uids(out))
    assert len(removed) == len(bad)
    assert len(removed & bad) >= 0.8 * len(bad)  # the lowest scores are the planted ones (chance: 0.25)
