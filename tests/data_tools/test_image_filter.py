"""filter --target (DataComp's image-based rule, data_tools/image_filter.py) and data-tools keep.

The pool is a synthetic embeddings folder: four tight clusters around planted unit directions, one of them
the embedding of the target image (by the export model the folder's embed.json names), so the rule must
keep exactly that cluster. References are computed here: the target embedded by open_clip alone, and a
numpy argmax over the centroids the job wrote; keep-list algebra against collections.Counter.
"""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import write_export
from PIL import Image, ImageDraw

from data_tools.cli import main
from data_tools.embeddings import METADATA_SCHEMA, MODEL_FILE, embedding_files, metadata_files
from data_tools.filter import FilterConfig
from data_tools.filter_tasks import filter_job
from data_tools.image_filter import default_clusters
from data_tools.report.sampling import check_keep_list, sample_decisions
from data_tools.runner import RunnerOptions

PER_CLUSTER = 60
CLUSTERS = 4
SHARDS = 3
TARGET = 2  # the planted cluster around the target image's embedding


def draw(path: Path, colour: str, box: tuple[int, int, int, int]) -> None:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse(box, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def reference_embedding(export: Path, image: Path) -> np.ndarray:
    """The target image embedded by open_clip alone (the export's own validation transform)."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    with torch.no_grad():
        row = model.eval().encode_image(preprocess(Image.open(image).convert("RGB"))[None])
    return torch.nn.functional.normalize(row, dim=-1)[0].numpy()


def write_pool(folder: Path, centres: np.ndarray, export: Path | None, seed: int = 0) -> np.ndarray:
    """An embeddings folder of tight clusters around ``centres`` (rows shuffled over SHARDS shards), with
    clip scores; returns each row's planted cluster, in row order."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(len(centres)), PER_CLUSTER))
    rows = centres[labels] + rng.normal(0, 0.02, (len(labels), centres.shape[1]))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    for shard, part in enumerate(np.array_split(np.arange(len(labels)), SHARDS)):
        files = embedding_files(folder, shard)
        for path in (files.image, files.metadata):
            path.parent.mkdir(parents=True, exist_ok=True)
        np.save(files.image, rows[part].astype(np.float16))
        meta = [{"key": f"{i:05d}", "uid": f"{i:032x}", "clip_score": float(rng.uniform())} for i in part]
        pq.write_table(pa.Table.from_pylist(meta, schema=METADATA_SCHEMA), files.metadata)
    if export is not None:
        (folder / MODEL_FILE).write_text(json.dumps(model_record(str(export), None)))
    return labels


def model_record(model: str, pretrained: str | None) -> dict:
    """What embed writes in embed.json (a local path made absolute)."""
    return {"model": str(Path(model).resolve()) if Path(model).exists() else model, "pretrained": pretrained}


def uids(path: Path) -> list[str]:
    return pq.read_table(path)["uid"].to_pylist()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The export model, the target as an image folder and as an eval set, and the pool around it."""
    root = tmp_path_factory.mktemp("image-filter")
    export = write_export(root / "export")
    draw(root / "folder" / "circle" / "target.png", "red", (8, 8, 56, 56))
    assert main(["eval-set", "--input", str(root / "folder"), "--output", str(root / "evalset")]) == 0
    target = reference_embedding(export, root / "folder" / "circle" / "target.png")
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(CLUSTERS, len(target)))
    centres[TARGET] = target
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = write_pool(root / "pool", centres, export)
    return {"root": root, "export": export, "target": target, "labels": labels}


def run_filter(setup: dict, name: str, *extra: str) -> Path:
    output = setup["root"] / "runs" / name / "keep.parquet"
    args = ["filter", "--embeddings", str(setup["root"] / "pool"), "--output", str(output), *extra]
    assert main(args) == 0
    return output


def test_planted_cluster_is_kept_and_matches_brute_force(setup: dict) -> None:
    output = run_filter(setup, "folder", "--target", str(setup["root"] / "folder"), "--clusters", "4")
    kept = set(uids(output))
    assert kept == {f"{i:032x}" for i in np.flatnonzero(setup["labels"] == TARGET)}
    # brute force with the job's centroids: numpy argmax of pool rows and of the reference target embedding
    clusters = np.load(output.parent / "keep_clusters.npz")
    centroids = clusters["centroids"]
    pool = np.concatenate([np.load(embedding_files(setup["root"] / "pool", s).image) for s in range(SHARDS)])
    chosen = {int(np.argmax(centroids @ setup["target"]))}
    assert set(np.flatnonzero(clusters["kept"])) == chosen
    assigned = np.argmax(pool.astype(np.float32) @ centroids.T, axis=1)
    assert kept == {f"{i:032x}" for i in np.flatnonzero(np.isin(assigned, list(chosen)))}
    summary = json.loads((output.parent / "keep_summary.json").read_text())
    assert summary["failed_rule"] == {"image_based": PER_CLUSTER * (CLUSTERS - 1)}
    info = json.loads((output.parent / "keep_clusters.json").read_text())
    assert info["kept"] == [{"cluster": min(chosen), "target_images": 1}] and info["clusters"] == CLUSTERS


def test_eval_set_target_equals_image_folder_target(setup: dict) -> None:
    folder = run_filter(setup, "folder-2", "--target", str(setup["root"] / "folder"), "--clusters", "4")
    evalset = run_filter(setup, "evalset", "--target", str(setup["root"] / "evalset"), "--clusters", "4")
    assert uids(folder) == uids(evalset)


def test_composes_with_min_score_as_the_intersection(setup: dict) -> None:
    target = ["--target", str(setup["root"] / "evalset"), "--clusters", "4"]
    both = run_filter(setup, "both", *target, "--min-score", "0.5")
    image = run_filter(setup, "image", *target)
    score = run_filter(setup, "score", "--min-score", "0.5")
    assert Counter(uids(both)) == Counter(uids(image)) & Counter(uids(score))
    failed = json.loads((both.parent / "keep_summary.json").read_text())["failed_rule"]
    assert set(failed) == {"score", "image_based"}
    combined = setup["root"] / "intersect.parquet"
    assert main(["keep", "--intersect", str(image), str(score), "--output", str(combined)]) == 0
    assert sorted(uids(combined)) == sorted(uids(both))


def test_two_rank_split_equals_local(setup: dict) -> None:
    assert default_clusters(12_800_000) == 100_000 and default_clusters(240) == 1  # DataComp's ratio
    cfg = FilterConfig(targets=(str(setup["root"] / "folder"),), clusters=CLUSTERS)
    pool, root = setup["root"] / "pool", setup["root"]
    local = filter_job(pool, root / "local" / "keep.parquet", cfg, RunnerOptions())
    with ThreadPoolExecutor(2) as pool_threads:
        runs = [
            pool_threads.submit(
                filter_job, pool, root / "split" / "keep.parquet", cfg, RunnerOptions(rank=r, world=2)
            )
            for r in range(2)
        ]
        results = [run.result() for run in runs]
    assert results[1] is None and results[0]["kept"] == local["kept"] == PER_CLUSTER
    assert uids(root / "split" / "keep.parquet") == uids(root / "local" / "keep.parquet")
    assert local["image_based"] == {"clusters": CLUSTERS, "kept_clusters": 1, "target_images": 1}


def one_line_error(capsys: pytest.CaptureFixture, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


def test_refusals_are_one_line(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, out = setup["root"], str(tmp_path / "keep.parquet")
    base = ["filter", "--embeddings", str(root / "pool"), "--output", out]
    assert "--target" in one_line_error(capsys, [*base, "--target", str(tmp_path / "no")])
    err = one_line_error(capsys, [*base, "--target", str(root / "folder"), "--clusters", "1000"])
    assert "--clusters 1000 is more than the 240 samples" in err
    unknown = tmp_path / "unknown"
    write_pool(unknown, np.eye(CLUSTERS, 16), None)
    err = one_line_error(
        capsys, ["filter", "--embeddings", str(unknown), "--output", out, "--target", str(root / "folder")]
    )
    assert f"{MODEL_FILE} not found" in err
    (unknown / MODEL_FILE).write_text(json.dumps(model_record(str(setup["export"]), None)))  # 128-dim model
    err = one_line_error(
        capsys, ["filter", "--embeddings", str(unknown), "--output", out, "--target", str(root / "folder")]
    )
    assert "128-dim image embeddings" in err and "16-dim" in err
    (unknown / MODEL_FILE).write_text(json.dumps(model_record("tiny-clip", None)))
    err = one_line_error(
        capsys, ["filter", "--embeddings", str(unknown), "--output", out, "--target", str(root / "folder")]
    )
    assert "random weights" in err


def test_keep_list_algebra_matches_counters(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pool = [f"{int(x):032x}" for x in rng.integers(0, 2**62, 50)]
    lists = [list(rng.choice(pool, 40)) for _ in range(3)]  # with repeats: reshard's upsampling counts
    files = []
    for i, listed in enumerate(lists):
        files.append(tmp_path / f"{i}.parquet")
        pq.write_table(pa.table({"uid": listed}), files[-1])
    files[2] = tmp_path / "2.npy"  # DataComp's format in
    halves = [(int(u[:16], 16), int(u[16:], 16)) for u in lists[2]]
    np.save(files[2], np.array(halves, dtype=np.dtype("u8,u8")))
    a, b, c = (Counter(listed) for listed in lists)
    expected = {
        "union": a | b | c,
        "intersect": a & b & c,
        "subtract": Counter({u: n for u, n in a.items() if u not in b and u not in c}),
    }
    for operation, counts in expected.items():
        output = tmp_path / f"{operation}.parquet"
        assert (
            main(
                ["keep", f"--{operation}", *map(str, files), "--output", str(output), "--format", "datacomp"]
            )
            == 0
        )
        assert Counter(uids(output)) == counts
        assert len(np.load(output.with_suffix(".npy"))) == sum(counts.values())
    assert (
        main(["keep", "--union", str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "x.parquet")])
        == 2
    )


def test_report_recomputes_image_based_decisions(setup: dict) -> None:
    """data-tools report rebuilds the rule from STEM_clusters.npz: its shown decisions agree with the list."""
    output = run_filter(setup, "report", "--target", str(setup["root"] / "folder"), "--clusters", "4")
    summary = json.loads((output.parent / "keep_summary.json").read_text())
    files = metadata_files(setup["root"] / "pool")
    decisions = sample_decisions(files, summary, output, None, 5, np.random.default_rng(0))
    check_keep_list(output, decisions)
    assert {name: len(tiles) for name, tiles in decisions.groups.items()} == {"kept": 5, "image_based": 5}
    assert decisions.disagree == 0
