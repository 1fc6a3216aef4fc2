"""SemDeDup (semantic.py) as partitioned task phases (see data_tools/phases.py).

1. ``sample``: one task per shard draws its rows of the k-means sample: the sample of one generator
   drawing one random number per row, shard after shard, whatever the split, because a task jumps that
   generator (PCG64) ahead by the rows before its shard;
2. ``centroids``: one task trains k-means on the whole sample;
3. ``assign``: one task per shard finds each row's clusters (its own plus boundary probes) and spills the
   bucket entries (index, member flag, fp16 vector, cluster), split by partition ``cluster % P``;
4. ``pairs``: one task per partition rebuilds each of its clusters' buckets and runs the blocked
   similarity search (``bucket_edges``) on each;
5. merge (rank 0): connected components of all pairs.

Memory: a sample or assign task holds one shard's embeddings; the k-means task the sample (at most 256
rows per cluster); a pairs task its partition's buckets, about ``(1 + probes) n d / P`` fp16 values, and one
similarity block; the merge O(n) labels, similarities and scores plus the pairs. Spill files live under
``DIR/semantic-work/`` (the output folder, shared by the nodes: a shared disk or an fsspec store such as
``s3://…``) and are removed after the merge. The embeddings folder may be a URL too.
"""

from __future__ import annotations

import math
import multiprocessing
from dataclasses import asdict
from typing import Any

import numpy as np

from data_tools.dedup.groups import connected_components
from data_tools.dedup.semantic import (
    CLUSTER_SIZE,
    SemanticConfig,
    SemanticResult,
    bucket_edges,
    embedding_parts,
    kmeans_centroids,
    nearest_clusters,
    part_rows,
    read_part,
    sample_rate,
    unit_rows,
)
from data_tools.dedup.shuffle import marker_path, read_partition, write_partitioned
from data_tools.phases import input_fingerprint, release_scratch, run_phase, settings_key
from data_tools.runner import RunnerOptions, Task
from webshards import outputs
from webshards.outputs import Location

SCRATCH = "semantic-work"


def semantic_job(embeddings: Location, output: Location, cfg: SemanticConfig, options: RunnerOptions) -> Any:
    """Duplicate components of the image embeddings as task phases; a SemanticResult on rank 0, else None."""
    parts = embedding_parts(embeddings)
    rows = part_rows(parts)
    n = sum(rows)
    if n == 0:
        raise ValueError(f"no embeddings in {embeddings}")
    k = cfg.clusters or max(1, math.ceil(n / CLUSTER_SIZE))
    scratch = outputs.join(output, SCRATCH)
    fingerprint = input_fingerprint([f for part in parts for f in part])
    work = outputs.join(
        scratch, settings_key({"cfg": asdict(cfg), "P": options.partitions, "inputs": fingerprint})
    )
    offsets = np.cumsum([0, *rows])
    centroids = centroid_phases(parts, offsets, k, cfg, work, options)
    folder = outputs.join(work, "assign")
    payload = (centroids, cfg, options.partitions)
    tasks = [
        Task(f"assign:{i}", marker_path(folder, i), (p, int(offsets[i]), *payload))
        for i, (_, p) in enumerate(parts)
    ]
    run_phase(tasks, assign_task, options, "dedup semantic (assign)")
    markers = [task.output for task in tasks]
    pair_tasks = [
        Task(f"pairs:{p}", outputs.join(work, f"pairs/{p:05d}.npy"), (markers, p, cfg.eps))
        for p in range(options.partitions)
    ]
    run_phase(pair_tasks, pairs_task, options, "dedup semantic (pairs)", last=True)
    if not options.is_merger:
        release_scratch(scratch, work, options)
        return None
    trained = len(outputs.load_npy(centroids))  # k-means may train fewer clusters than asked
    result = _merge(parts, markers, [task.output for task in pair_tasks], n, cfg, trained)
    release_scratch(scratch, work, options)
    return result


def centroid_phases(
    parts: list[tuple[Location, Location]],
    offsets: np.ndarray,
    k: int,
    cfg: SemanticConfig,
    work: Location,
    options: RunnerOptions,
    desc: str = "dedup semantic",
) -> Location:
    """The sample phase, then the one k-means task (seeded: the same centroids on any split of the
    tasks); returns the centroids file. Also the clustering of ``filter --target`` (image_filter.py)."""
    rate = sample_rate(int(offsets[-1]), k)
    tasks = [
        Task(f"sample:{i}", outputs.join(work, f"sample/{i:05d}.npy"), (p, rate, cfg.seed, int(offsets[i])))
        for i, (_, p) in enumerate(parts)
    ]
    run_phase(tasks, sample_task, options, f"{desc} (sample)")
    train = Task("centroids", outputs.join(work, "centroids.npy"), ([t.output for t in tasks], k, cfg))
    run_phase([train], centroids_task, options, f"{desc} (k-means)")
    return train.output


def sample_task(task: Task) -> int:
    """One shard's k-means sample rows: the generator jumped past the rows of the shards before it."""
    image_file, rate, seed, offset = task.payload
    raw = read_part(image_file)
    bits = np.random.PCG64(seed)
    bits.advance(offset)  # one 64-bit draw per row for Generator.random
    draws = np.random.Generator(bits).random(len(raw))
    outputs.save_npy(task.output, unit_rows(raw[draws < rate]))
    return len(raw)


def centroids_task(task: Task) -> int:
    """k-means on the whole sample, shards in order."""
    files, k, cfg = task.payload
    fork_safe_faiss()
    sample = np.concatenate([outputs.load_npy(f) for f in files])
    outputs.save_npy(task.output, kmeans_centroids(sample, k, cfg))
    return len(sample)


def assign_task(task: Task) -> int:
    """One shard's bucket entries, split by partition, and each row's similarity to its own centroid."""
    image_file, offset, centroids, cfg, partitions = task.payload
    fork_safe_faiss()
    raw = np.asarray(read_part(image_file))
    own_sim, unchecked, (clusters, rows, member) = nearest_clusters(outputs.load_npy(centroids), cfg)(raw)
    dtype = np.dtype(
        [("cluster", "<i8"), ("index", "<i8"), ("member", "u1"), ("vec", "<f2", (raw.shape[1],))]
    )
    records = np.empty(len(rows), dtype=dtype)
    records["cluster"], records["index"], records["member"], records["vec"] = (
        clusters,
        offset + rows,
        member,
        raw[rows],
    )
    with outputs.staged(_sims_path(task.output)) as tmp, open(tmp, "wb") as f:
        np.savez(f, sim=own_sim, unchecked=np.int64(unchecked))
    write_partitioned(task.output, records, records["cluster"] % partitions, partitions)
    return len(raw)


def fork_safe_faiss() -> None:
    """In a forked pool worker, one OpenMP thread for faiss: the parent's OpenMP pool does not survive a
    fork, and faiss would wait for it forever. The results do not depend on the thread count."""
    if multiprocessing.parent_process() is not None:
        import faiss

        faiss.omp_set_num_threads(1)


def _sims_path(marker: Location) -> Location:
    return outputs.with_name(marker, outputs.name(marker).replace(".bounds.npy", ".sims.npz"))


def pairs_task(task: Task) -> int:
    """The duplicate pairs inside every cluster of one partition, bucket by bucket."""
    markers, partition, eps = task.payload
    records = read_partition(markers, partition)
    records = records[np.argsort(records["cluster"], kind="stable")]
    bounds = np.flatnonzero(np.diff(records["cluster"])) + 1
    edges = [bucket_edges(bucket, eps) for bucket in np.split(records, bounds) if len(bucket)]
    outputs.save_npy(task.output, np.concatenate(edges) if edges else np.zeros((0, 2), dtype=np.int64))
    return len(records)


def _merge(
    parts: list[tuple[Location, Location]],
    markers: list[Location],
    pair_files: list[Location],
    n: int,
    cfg: SemanticConfig,
    k: int,
) -> SemanticResult:
    """Components of all pairs plus the per-item values the keep policies need."""
    edges = np.concatenate([outputs.load_npy(f) for f in pair_files])
    labels = connected_components(n, edges)
    sims = [outputs.load_npy(_sims_path(m)) for m in markers]
    centroid_sim = np.concatenate([s["sim"] for s in sims]).astype(np.float32)
    unchecked = int(sum(int(s["unchecked"]) for s in sims))
    scores = [outputs.read_parquet(m, ["clip_score"])["clip_score"].to_numpy() for m, _ in parts]
    info = {"eps": cfg.eps, "clusters": k, "probes": cfg.probes, "unchecked": unchecked}
    return SemanticResult(labels, centroid_sim, np.concatenate(scores), {**info, "exact": unchecked == 0})
