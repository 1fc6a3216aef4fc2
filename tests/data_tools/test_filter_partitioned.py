"""``filter`` as per-shard task phases (filter_tasks.py) writes exactly the files of one plain pass.

Scores are full of ties (rounded to 3 decimals, so whole bins tie), shards are uneven (one empty); the job
runs with 1 and 2 workers, as a two-rank split (two processes) and resumed after half its tasks. The
reference takes its threshold from a brute-force sort of every score, then applies the rules table by table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.embeddings import METADATA_SCHEMA, embedding_files, metadata_files
from data_tools.filter import (
    KEEP_SCHEMA,
    FilterConfig,
    Tally,
    filtered_tables,
    histogram_path,
    kept_uids,
    summary_path,
    write_outputs,
)
from data_tools.filter_tasks import filter_job
from data_tools.phases import JobFailed
from data_tools.runner import RunnerOptions

ROOT = Path(__file__).resolve().parents[2]
SIZES = (300, 0, 457, 1, 242)


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """Metadata parquets with tied scores, sizes and captions; returns the folder and all scores."""
    folder = tmp_path_factory.mktemp("embeddings")
    rng = np.random.default_rng(7)
    scores = np.round(rng.normal(0.25, 0.08, sum(SIZES)), 3).astype(np.float32)
    start = 0
    for shard, size in enumerate(SIZES):
        rows = [
            {
                "key": f"{shard}-{j}",
                "uid": f"{start + j:032x}",
                "caption": " ".join(["word"] * int(rng.integers(0, 5))),
                "clip_score": float(scores[start + j]),
                "width": int(rng.integers(10, 60)),
                "height": int(rng.integers(10, 60)),
            }
            for j in range(size)
        ]
        path = embedding_files(folder, shard).metadata
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=METADATA_SCHEMA), path)
        start += size
    return folder, scores


def outputs(keep: Path) -> dict[str, bytes]:
    """Every file filter writes, by name (the keep list's path inside the summary made relative)."""
    files = {p.name.replace(keep.stem, "KEEP"): p.read_bytes() for p in keep.parent.iterdir() if p.is_file()}
    summary = json.loads(files.pop("KEEP_summary.json"))
    summary["keep_list"] = Path(summary["keep_list"]).name
    files.pop(
        "KEEP_lineage.json", None
    )  # the job's record of itself (test_lineage.py); references write none
    return {**files, "summary": json.dumps(summary).encode()}


def brute_force_threshold(scores: np.ndarray, cfg: FilterConfig) -> float:
    """The given score, none, or the ``round(F * n)``-th best of all scores, ties included (+inf: keep none)."""
    if cfg.keep_fraction is None:
        return -math.inf if cfg.min_score is None else cfg.min_score
    count = round(cfg.keep_fraction * len(scores))
    return float(np.sort(scores)[::-1][count - 1]) if count else math.inf


def reference(
    tmp_path: Path, embeddings: tuple[Path, np.ndarray], cfg: FilterConfig, fmt: str = "parquet"
) -> dict[str, bytes]:
    """The files of filter in one plain pass: the brute-force threshold, then every table's rules in order."""
    folder, scores = embeddings
    keep = tmp_path / "reference" / "keep.parquet"
    keep.parent.mkdir()
    threshold, tally = brute_force_threshold(scores, cfg), Tally()
    with pq.ParquetWriter(keep, KEEP_SCHEMA) as writer:
        for table, masks in filtered_tables(metadata_files(folder), cfg, threshold, None):
            writer.write_table(kept_uids(table, tally.add(table, masks)))
    write_outputs(keep, fmt, tally, cfg, threshold)
    return outputs(keep)


CASES = [
    FilterConfig(keep_fraction=0.3, min_words=2),
    FilterConfig(keep_fraction=0.0),
    FilterConfig(keep_fraction=1.0, min_side=20, max_aspect_ratio=2.0),
    FilterConfig(keep_fraction=0.517),
    FilterConfig(min_score=0.25, min_side=30),
]


@pytest.mark.parametrize("cfg", CASES)
@pytest.mark.parametrize("workers", [1, 2])
def test_job_writes_the_reference_files(embeddings, tmp_path: Path, cfg: FilterConfig, workers: int) -> None:
    folder, scores = embeddings
    keep = tmp_path / "job" / "keep.parquet"
    summary = filter_job(folder, keep, cfg, RunnerOptions(workers=workers, rank=0, world=1), "datacomp")
    assert outputs(keep) == reference(tmp_path, embeddings, cfg, "datacomp")
    assert not (tmp_path / "job" / "keep_work").exists()  # scratch removed after the merge
    if cfg.keep_fraction is not None:  # brute force: the round(F * n)-th best score, ties included
        ranked = np.sort(scores)[::-1]
        count = round(cfg.keep_fraction * len(scores))
        expected = ranked[count - 1] if count else math.inf
        assert (summary["score_threshold"] or math.inf) == float(expected)
        assert int((scores >= expected).sum()) >= count


def test_two_ranks_and_a_resumed_run(embeddings, tmp_path: Path) -> None:
    folder, _ = embeddings
    cfg = FilterConfig(keep_fraction=0.3, min_words=1)
    expected = reference(tmp_path, embeddings, cfg)
    keep = tmp_path / "ranks" / "keep.parquet"
    args = ["filter", "--embeddings", str(folder), "--keep-fraction", "0.3", "--min-words", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "data_tools.cli",
                *args,
                "--output",
                str(keep),
                "--rank",
                str(r),
                "--world",
                "2",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    (out0, err0), (out1, err1) = (p.communicate(timeout=300) for p in procs)
    assert [p.returncode for p in procs] == [0, 0], (err0, err1)
    assert "filter: kept" in out0 and "rank 0 writes" in out1
    assert outputs(keep) == expected

    resumed = tmp_path / "resumed" / "keep.parquet"
    with pytest.raises(JobFailed, match=r"filter \(score counts\): 2 task\(s\) of other ranks not complete"):
        filter_job(folder, resumed, cfg, RunnerOptions(rank=0, world=2, phase_timeout=0.5))
    assert not resumed.exists() and len(list(resumed.parent.rglob("*.npy"))) == 3
    filter_job(folder, resumed, cfg, RunnerOptions(rank=0, world=1))
    assert outputs(resumed) == expected
    assert summary_path(resumed).exists() and histogram_path(resumed).exists()
