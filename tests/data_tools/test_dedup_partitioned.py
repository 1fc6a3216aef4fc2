"""Partitioned dedup jobs (hashed_job.py, semantic_job.py) give exactly the files of a reference.

Inputs are full of duplicates and ties; each job runs with 1, 3 and 7 partitions, 1 and 2 workers, as a
two-rank split (two processes), and resumed after half its tasks; the files must equal a reference's (exact
and perceptual: a brute-force search of every pair; semantic: SemDeDup in one process, written plainly
here), and the groups a brute-force all-pairs search that shares no code with the job.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.dedup import DedupConfig, find_duplicates, semantic_groups, write_report
from data_tools.dedup.features import FeatureJob, feature_files, iter_tables, read_features
from data_tools.dedup.groups import connected_components, group_ids
from data_tools.dedup.semantic import (
    CLUSTER_SIZE,
    SemanticResult,
    bucket_edges,
    embedding_parts,
    kmeans_centroids,
    nearest_clusters,
    read_part,
    sample_rate,
    unit_rows,
)
from data_tools.embeddings import METADATA_SCHEMA, embedding_files
from data_tools.phases import JobFailed
from data_tools.runner import RunnerOptions

ROOT = Path(__file__).resolve().parents[2]
SHARD_SIZES = (37, 0, 61, 1, 45)  # uneven, one empty and one single-item shard
URLS = [f"/nowhere/{i:05d}.tar" for i in range(len(SHARD_SIZES))]  # hashes exist already: never opened
TIMING = ("seconds", "hash_seconds")


def union_groups(n: int, pairs: list[tuple[int, int]]) -> set[frozenset[int]]:
    """Groups (sets of item indices, 2 or more) that the pairs connect: a plain union-find."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in pairs:
        parent[root(a)] = root(b)
    members = defaultdict(set)
    for i in range(n):
        members[root(i)].add(i)
    return {frozenset(m) for m in members.values() if len(m) > 1}


def found_groups(output: Path) -> set[frozenset[int]]:
    groups = np.array(pq.read_table(output / "duplicates.parquet")["group"].to_pylist(), dtype=np.int64)
    return {frozenset(np.flatnonzero(groups == g).tolist()) for g in range(groups.max() + 1)}


def assert_same_files(output: Path, reference: Path) -> None:
    """duplicates.parquet and keep.parquet equal row for row; report.json equal but for timings."""
    for name in ("duplicates.parquet", "keep.parquet"):
        assert pq.read_table(output / name).equals(pq.read_table(reference / name)), name
    report, expected = (json.loads((d / "report.json").read_text()) for d in (output, reference))
    assert {k: v for k, v in report.items() if k not in TIMING} == {
        k: v for k, v in expected.items() if k not in TIMING
    }


def perceptual_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Hashes in clusters: equal copies (ties) and copies 1..14 bits away, around the threshold 10."""
    hashes = rng.integers(0, 2**63, size=n, dtype=np.int64).astype(np.uint64)
    for i in range(1, n):
        if rng.random() < 0.5:
            source = hashes[rng.integers(i)]
            flips = rng.choice(64, size=int(rng.integers(0, 15)), replace=False)
            hashes[i] = source ^ np.uint64(sum(1 << int(b) for b in flips))
    return hashes


def exact_digests(rng: np.random.Generator, n: int) -> np.ndarray:
    """32-byte digests, half of them copies of earlier ones."""
    digests = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
    for i in range(1, n):
        if rng.random() < 0.5:
            digests[i] = digests[rng.integers(i)]
    return digests


def write_features(output: Path, method: str, features: np.ndarray, pixels: np.ndarray) -> None:
    """Feature files as the hash tasks write them, so a run skips hashing and groups these."""
    files = feature_files(output, FeatureJob(method), len(SHARD_SIZES))
    start = 0
    for path, size in zip(files, SHARD_SIZES):
        rows = range(start, start + size)
        if method == "exact":
            column = pa.array([features[i].tobytes() for i in rows], type=pa.binary(32))
        else:
            column = pa.array(features[start : start + size], type=pa.uint64())
        table = pa.table(
            {
                "key": [f"k{i}" for i in rows],
                "uid": [f"{i:032x}" for i in rows],
                "caption": [f"item {i}" for i in rows],
                "pixels": pa.array(pixels[start : start + size], pa.int64()),
                "digest" if method == "exact" else "phash": column,
            }
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        start += size


def make_features(method: str, factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, Path]:
    """Hashes (with ties) and pixel counts (with ties, for the "largest" policy) in a features folder."""
    rng = np.random.default_rng(1)
    n = sum(SHARD_SIZES)
    features = exact_digests(rng, n) if method == "exact" else perceptual_hashes(rng, n)
    pixels = rng.integers(1, 4, size=n) * 100
    seed_dir = factory.mktemp(f"features-{method}")
    write_features(seed_dir, method, features, pixels)
    return features, pixels, seed_dir


@pytest.fixture(scope="module", params=["exact", "perceptual"])
def hashed_case(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray, Path, Path]:
    """(method, features, folder of its feature files, reference output)."""
    method = request.param
    features, _, seed_dir = make_features(method, tmp_path_factory)
    reference = tmp_path_factory.mktemp(f"reference-{method}")
    hashed_reference(reference, DedupConfig(method, keep_policy="largest"), shard_features(seed_dir, method))
    return method, features, seed_dir, reference


def shard_features(output: Path, method: str, shards: int = len(SHARD_SIZES)) -> list[Path]:
    return feature_files(output, FeatureJob(method), shards)


def brute_force_pairs(method: str, features: np.ndarray, bits: int = 10) -> list[tuple[int, int]]:
    """Every pair of equal digests (exact) or of hashes at most ``bits`` apart (perceptual)."""
    n = len(features)
    if method == "exact":
        return [(a, b) for a in range(n) for b in range(a) if features[a].tobytes() == features[b].tobytes()]
    return [
        (a, b) for a in range(n) for b in range(a) if bin(int(features[a] ^ features[b])).count("1") <= bits
    ]


def brute_force(method: str, features: np.ndarray, bits: int = 10) -> set[frozenset[int]]:
    return union_groups(len(features), brute_force_pairs(method, features, bits))


def hashed_reference(output: Path, cfg: DedupConfig, files: list[Path]) -> None:
    """The files of exact or perceptual dedup from a brute-force search of every pair of the hashes in
    ``files``: groups, the keep policy and the outputs as a job writes them."""
    features, pixels = read_features(files, cfg.method)
    pairs = np.array(brute_force_pairs(cfg.method, features, cfg.bits), dtype=np.int64).reshape(-1, 2)
    groups = group_ids(connected_components(len(features), pairs))
    priority = pixels.astype(np.float64) if cfg.policy == "largest" else np.zeros(len(pixels))
    info = {"with_caption": cfg.with_caption} if cfg.method == "exact" else {"threshold_bits": cfg.bits}
    write_report(output, cfg, (groups, priority, iter_tables(files), info), time.perf_counter())


def fresh_output(seed_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    (out / "features").parent.mkdir(parents=True, exist_ok=True)
    os.symlink(seed_dir / "features", out / "features")
    return out


@pytest.mark.parametrize("partitions, workers", [(1, 1), (3, 2), (7, 1), (7, 2)])
def test_hashed_job_equals_reference_and_brute_force(
    hashed_case, tmp_path: Path, partitions, workers
) -> None:
    method, features, seed_dir, reference = hashed_case
    out = fresh_output(seed_dir, tmp_path)
    job = RunnerOptions(workers=workers, rank=0, world=1, partitions=partitions)
    find_duplicates(out, DedupConfig(method, keep_policy="largest"), job, URLS)
    assert_same_files(out, reference)
    expected = brute_force(method, features)
    assert len(expected) > 10 and found_groups(out) == expected
    assert not (out / "partitions").exists()  # scratch removed after the merge


@pytest.mark.parametrize("bits", [0, 3, 32])
def test_perceptual_job_at_other_thresholds(tmp_path_factory, tmp_path: Path, bits: int) -> None:
    """One band of 64 bits (threshold 0) up to 33 bands of one or two bits (threshold 32)."""
    method = "perceptual"
    features, _, seed_dir = make_features(method, tmp_path_factory)
    cfg = DedupConfig("perceptual", threshold=bits)
    (tmp_path / "ref" / "out").mkdir(parents=True)
    hashed_reference(tmp_path / "ref" / "out", cfg, shard_features(seed_dir, method))
    job = RunnerOptions(rank=0, world=1, partitions=3)
    find_duplicates(fresh_output(seed_dir, tmp_path / "job"), cfg, job, URLS)
    assert_same_files(tmp_path / "job" / "out", tmp_path / "ref" / "out")
    assert found_groups(tmp_path / "job" / "out") == brute_force(method, features, bits)


def cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "data_tools.cli", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def two_ranks(args: list[str]) -> list[str]:
    """Run ``args`` as rank 0 and rank 1 of a world of 2 at the same time; their stdout."""
    procs = [cli([*args, "--rank", str(r), "--world", "2", "--phase-timeout", "120"]) for r in (0, 1)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    return [out for out, _ in outputs]


def test_hashed_job_on_two_ranks(hashed_case, tmp_path: Path) -> None:
    method, _, seed_dir, reference = hashed_case
    out = fresh_output(seed_dir, tmp_path)
    spec = "/nowhere/{00000..00004}.tar"
    args = ["dedup", "--method", method, "--shards", spec, "--keep-policy", "largest", "--output", str(out)]
    rank0, rank1 = two_ranks([*args, "--partitions", "3"])
    assert "removed" in rank0 and "rank 0 writes" in rank1
    assert_same_files(out, reference)


def test_a_rank_alone_times_out_with_one_line(hashed_case, tmp_path: Path) -> None:
    method, _, seed_dir, _ = hashed_case
    out = fresh_output(seed_dir, tmp_path)
    args = ["dedup", "--method", method, "--shards", "/nowhere/{00000..00004}.tar", "--output", str(out)]
    _, err = cli([*args, "--rank", "1", "--world", "2", "--phase-timeout", "1"]).communicate(timeout=120)
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and "(scatter): 3 task(s) of other ranks not complete after 1 s" in lines[0], err
    assert "Traceback" not in err


def test_hashed_job_resumes_after_half_the_tasks(hashed_case, tmp_path: Path) -> None:
    """Rank 0 of 2 alone does half of each phase's first tasks and gives up waiting; a rerun finishes."""
    method, _, seed_dir, reference = hashed_case
    out = fresh_output(seed_dir, tmp_path)
    cfg = DedupConfig(method, keep_policy="largest")
    half = RunnerOptions(rank=0, world=2, partitions=7, phase_timeout=0.5)
    with pytest.raises(JobFailed, match="not complete after 0.5 s"):
        find_duplicates(out, cfg, half, URLS)
    done = list((out / "partitions").rglob("*.bounds.npy"))
    assert 0 < len(done) < len(SHARD_SIZES)
    find_duplicates(out, cfg, RunnerOptions(partitions=7, rank=0, world=1), URLS)
    assert_same_files(out, reference)


def test_hashed_job_on_demo_shards(demo_data: Path, tmp_path: Path) -> None:
    """Real shards end to end (hashing included): flat procedural images give big perceptual groups."""
    spec = str(demo_data / "train" / "{00000..00003}.tar")
    from webshards.spec import expand_urls

    for method in ("exact", "perceptual"):
        cfg, job, ref = DedupConfig(method), tmp_path / f"job-{method}", tmp_path / f"ref-{method}"
        find_duplicates(job, cfg, RunnerOptions(workers=2, rank=0, world=1, partitions=3), expand_urls(spec))
        ref.mkdir()
        hashed_reference(ref, cfg, shard_features(job, method, 4))
        assert_same_files(job, ref)


def write_embedding_shards(folder: Path, vectors: np.ndarray, sizes: list[int]) -> None:
    """``vectors`` as fp16 image embeddings in shards of ``sizes``; clip_score of row i is i % 5 (ties)."""
    start = 0
    for shard, size in enumerate(sizes):
        rows = np.arange(start, start + size)
        files = embedding_files(folder, shard)
        for path in (files.image, files.metadata):
            path.parent.mkdir(parents=True, exist_ok=True)
        np.save(files.image, vectors[rows].astype(np.float16))
        meta = [
            {"key": f"k{i}", "uid": f"{i:032x}", "caption": f"c{i}", "clip_score": float(i % 5)} for i in rows
        ]
        pq.write_table(pa.Table.from_pylist(meta, schema=METADATA_SCHEMA), files.metadata)
        start += size


def semantic_vectors(n: int = 900, dim: int = 32) -> np.ndarray:
    """Unit vectors around 6 topics, with exact copies and near copies (cosine ~0.99) of earlier rows."""
    rng = np.random.default_rng(3)
    topics = rng.normal(size=(6, dim))
    vectors = topics[rng.integers(6, size=n)] + rng.normal(scale=0.6, size=(n, dim))
    for i in range(1, n):
        roll = rng.random()
        if roll < 0.1:
            vectors[i] = vectors[rng.integers(i)]
        elif roll < 0.25:
            vectors[i] = vectors[rng.integers(i)] + rng.normal(scale=0.02, size=dim)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)


def semantic_brute_force(vectors: np.ndarray, eps: float) -> set[frozenset[int]]:
    unit = vectors.astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    return union_groups(
        len(unit), [tuple(p) for p in np.argwhere(np.triu(unit @ unit.T > 1 - eps, 1)).tolist()]
    )


def semantic_reference(output: Path, cfg: DedupConfig, embeddings: Path) -> dict:
    """The files of SemDeDup in one process, written plainly: k-means on one generator's sample of the rows
    (one draw per row, shard after shard), each shard's rows to their own cluster and the boundary probes,
    the pairs inside each cluster's bucket, their components; returns the report."""
    semantic, parts = cfg.semantic(), embedding_parts(embeddings)
    shards = [np.asarray(read_part(image)) for _, image in parts]
    n = sum(len(raw) for raw in shards)
    k = semantic.clusters or max(1, math.ceil(n / CLUSTER_SIZE))
    rng, rate = np.random.default_rng(semantic.seed), sample_rate(n, k)
    sample = np.concatenate([unit_rows(raw[rng.random(len(raw)) < rate]) for raw in shards])
    centroids = kmeans_centroids(sample, k, semantic)
    search = nearest_clusters(centroids, semantic)
    own_sims, unchecked, buckets, offset = [], 0, defaultdict(list), 0
    for raw in shards:
        own, missed, (clusters, rows, member) = search(raw)
        own_sims.append(own)
        unchecked += missed
        for cluster, row, is_member in zip(clusters.tolist(), rows.tolist(), member.tolist()):
            buckets[cluster].append((offset + row, is_member, raw[row]))
        offset += len(raw)
    dtype = np.dtype([("index", "<i8"), ("member", "u1"), ("vec", "<f2", (centroids.shape[1],))])
    edges = [bucket_edges(np.array(bucket, dtype=dtype), semantic.eps) for bucket in buckets.values()]
    labels = connected_components(n, np.concatenate(edges))
    scores = np.concatenate(
        [pq.read_table(m, columns=["clip_score"])["clip_score"].to_numpy() for m, _ in parts]
    )
    info = {
        "eps": semantic.eps,
        "clusters": len(centroids),
        "probes": semantic.probes,
        "unchecked": unchecked,
    }
    result = SemanticResult(labels, np.concatenate(own_sims), scores, {**info, "exact": unchecked == 0})
    return write_report(output, cfg, semantic_groups(result, cfg.policy, embeddings), time.perf_counter())


@pytest.fixture(scope="module")
def semantic_case(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, Path, Path]:
    vectors = semantic_vectors()
    emb = tmp_path_factory.mktemp("emb")
    write_embedding_shards(emb, vectors, [200, 0, 333, 1, 366])
    reference = tmp_path_factory.mktemp("semantic-reference")
    semantic_reference(reference, SEMANTIC, emb)
    return vectors, emb, reference


SEMANTIC = DedupConfig("semantic", threshold=0.05, clusters=12, probes=12)


@pytest.mark.parametrize("partitions, workers", [(1, 1), (3, 2), (7, 1)])
def test_semantic_job_equals_reference_and_brute_force(
    semantic_case, tmp_path: Path, partitions, workers
) -> None:
    vectors, emb, reference = semantic_case
    job = RunnerOptions(workers=workers, rank=0, world=1, partitions=partitions)
    report = find_duplicates(tmp_path, SEMANTIC, job, embeddings=emb)
    assert report["exact"] and report["unchecked"] == 0
    assert_same_files(tmp_path, reference)
    expected = semantic_brute_force(vectors, 0.05)
    assert len(expected) > 20 and found_groups(tmp_path) == expected
    assert not (tmp_path / "semantic-work").exists()


def test_semantic_job_with_few_probes_equals_reference(semantic_case, tmp_path: Path) -> None:
    """With fewer probes than clusters (unchecked items) and k-means on a sample of the rows (3 x 256 of
    900), the job still equals one process."""
    _, emb, _ = semantic_case
    cfg = DedupConfig("semantic", threshold=0.05, clusters=3, probes=1, keep_policy="farthest")
    (tmp_path / "ref").mkdir()
    assert not semantic_reference(tmp_path / "ref", cfg, emb)["exact"]
    find_duplicates(tmp_path / "job", cfg, RunnerOptions(rank=0, world=1, partitions=3), embeddings=emb)
    assert_same_files(tmp_path / "job", tmp_path / "ref")


def test_semantic_job_on_two_ranks_and_resumed(semantic_case, tmp_path: Path) -> None:
    _, emb, reference = semantic_case
    base = ["dedup", "--method", "semantic", "--embeddings", str(emb), "--threshold", "0.05"]
    args = [*base, "--clusters", "12", "--probes", "12", "--partitions", "7"]
    rank0, rank1 = two_ranks([*args, "--output", str(tmp_path / "ranks")])
    assert "removed" in rank0 and "rank 0 writes" in rank1
    assert_same_files(tmp_path / "ranks", reference)
    half = RunnerOptions(rank=1, world=2, partitions=7, phase_timeout=0.5)
    with pytest.raises(JobFailed, match="dedup semantic .* not complete"):
        find_duplicates(tmp_path / "resumed", SEMANTIC, half, embeddings=emb)
    find_duplicates(
        tmp_path / "resumed", SEMANTIC, RunnerOptions(rank=0, world=1, partitions=7), embeddings=emb
    )
    assert_same_files(tmp_path / "resumed", reference)
