"""DataComp's image-based filter: keep the pool samples whose image lies in a k-means cluster that is the
nearest cluster of at least one target image (ImageNet's training images in DataComp; here eval sets or
image folders, ``filter --target ROOT``).

DataComp (arXiv 2304.14108, ``baselines/apply_filter.py``) clusters the L/14 image embeddings of the
12.8M-sample pool into 100K clusters (128 samples per cluster), assigns each ImageNet-1k training image to
its nearest centroid and keeps the pool samples of those clusters. Here, as task phases (phases.py):

1. ``targets``: one task per eval-set tar (or per image folder) embeds the images with the model that
   made the embeddings folder (its ``embed.json``, written by embed), decoded and transformed as embed does
   (decontamination's eval-set reading and ``EvalEmbedder``, data_tools/decontam/);
2. ``sample`` and ``k-means``: semantic dedup's clustering (``dedup.semantic_job.centroid_phases``:
   spherical k-means, seeded, the same centroids on any split of the tasks), K = pool size / 128 unless
   given;
3. ``choose``: one task assigns every target image to its nearest centroid and counts them per cluster;
4. the filter's keep tasks assign each pool row to its nearest centroid (``ImageRule.mask``): the
   ``image_based`` rule passes when that centroid is a chosen one.

Nearest means the largest inner product with the unit centroids, i.e. the least distance for unit rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.decontam.embedder import EvalEmbedder
from data_tools.decontam.evalimages import iter_images, open_eval_set
from data_tools.dedup.semantic import SemanticConfig, embedding_parts, part_rows, read_part
from data_tools.dedup.semantic_job import centroid_phases
from data_tools.embeddings import MODEL_FILE, embedding_files, model_file, recorded_model, shard_index
from data_tools.phases import run_phase, settings_key
from data_tools.runner import RunnerOptions, Task
from webshards import outputs
from webshards.outputs import Location

CLUSTER_SIZE = 128  # DataComp: 100K clusters for the 12.8M samples of its small pool
SEED = 0
ASSIGN_VALUES = 2**26  # floats of one block of the row-centroid similarity matrix (256 MiB)


def default_clusters(samples: int) -> int:
    """DataComp's ratio: one cluster per 128 pool samples, at least one."""
    return max(1, samples // CLUSTER_SIZE)


def nearest_centroid(rows: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of each row's nearest unit centroid (largest inner product; a row's norm cannot change it),
    in blocks so memory stays ``ASSIGN_VALUES`` floats whatever the number of clusters."""
    block = max(1, ASSIGN_VALUES // max(len(centroids), 1))
    found = [
        np.argmax(np.asarray(rows[i : i + block], dtype=np.float32) @ centroids.T, axis=1)
        for i in range(0, len(rows), block)
    ]
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def target_embedder(embeddings: Location) -> EvalEmbedder:
    """The image tower of the model that made the embeddings folder; a ValueError when that model cannot be
    known or cannot be loaded again with the same weights."""
    record = recorded_model(embeddings)
    if record is None:
        where = model_file(embeddings)
        raise ValueError(f"--target: {where} not found: which model made these embeddings is unknown")
    model, pretrained = record["model"], record.get("pretrained")
    if pretrained is None and not Path(model).exists() and not model.startswith("hf-hub:"):
        raise ValueError(
            f"--target: {embeddings} was embedded by {model} with random weights (no --pretrained), "
            "so the target images cannot be embedded by the same model"
        )
    return EvalEmbedder(model, pretrained)


def target_parts(root: str) -> list[tuple[str, str]]:
    """(part, kind) of one target: each tar of an eval set (clip_benchmark's layout), or an image folder
    whole: decontamination's reading of an eval set."""
    source = open_eval_set(root, "--target")
    return [(part, source.kind) for part in source.parts]


@lru_cache(maxsize=2)
def load_clusters(location: str) -> tuple[np.ndarray, np.ndarray]:
    """(centroids, target images per cluster) of a clusters ``.npz``, read once per process (every keep
    task of a worker uses the same)."""
    found = outputs.load_npy(location)
    return np.asarray(found["centroids"]), np.asarray(found["target_images"])


@dataclass(frozen=True)
class ImageRule:
    """What the keep tasks need for the ``image_based`` mask: file names, so a task payload stays small."""

    embeddings: str
    clusters: str
    """``.npz``: ``centroids``, ``target_images`` per cluster, ``kept`` (a cluster with a target image)."""

    def mask(self, metadata: Location) -> np.ndarray:
        """Whether each row of the shard of ``metadata`` lies in a chosen cluster."""
        rows = read_part(embedding_files(self.embeddings, shard_index(metadata)).image)
        centroids, counts = load_clusters(self.clusters)
        return counts[nearest_centroid(rows, centroids)] > 0


def rule_of_keep_list(keep_list: Location, metadata: Location) -> ImageRule | None:
    """The rule a filter with ``--target`` applied, from the ``STEM_clusters.npz`` beside its keep list and
    the embeddings folder holding ``metadata`` (a ``metadata/metadata_{i}.parquet``); None without one. For
    the report, which recomputes a filter's decisions."""
    clusters = outputs.beside(keep_list, "_clusters.npz")
    if not outputs.exists(clusters):
        return None
    root = str(metadata).rstrip("/").rsplit("/", 2)[0]  # DIR of DIR/metadata/metadata_{i}.parquet
    return ImageRule(root, str(clusters))


def image_rule_job(
    embeddings: Location,
    targets: tuple[str, ...],
    clusters: int | None,
    work: Location,
    options: RunnerOptions,
) -> ImageRule:
    """Embed the targets, cluster the pool and choose the clusters, as task phases; the rule on every rank."""
    embedder = target_embedder(embeddings)
    parts = embedding_parts(embeddings)
    rows = part_rows(parts)
    k = clusters or default_clusters(sum(rows))
    if k > sum(rows):
        raise ValueError(f"--clusters {k} is more than the {sum(rows)} samples of {embeddings}")
    sources = [part for root in targets for part in target_parts(root)]
    work = outputs.join(work, "image-" + settings_key({"targets": targets, "k": k, "model": embedder}))
    tasks = [
        Task(f"targets:{i}", outputs.join(work, f"targets/{i:05d}.npy"), (part, kind, embedder))
        for i, (part, kind) in enumerate(sources)
    ]
    run_phase(tasks, embed_targets_task, options, "filter image-based (targets)")
    _check_dims([t.output for t in tasks], parts[0][1], embeddings)
    offsets = np.cumsum([0, *rows])
    semantic = SemanticConfig(clusters=k, seed=SEED)
    centroids = centroid_phases(parts, offsets, k, semantic, work, options, "filter image-based")
    choose = Task("choose", outputs.join(work, "clusters.npz"), (centroids, [t.output for t in tasks]))
    run_phase([choose], choose_task, options, "filter image-based (choose)")
    return ImageRule(str(embeddings), str(choose.output))


def _check_dims(target_files: list[Location], pool_file: Location, embeddings: Location) -> None:
    """The targets' embeddings must have the pool's width (else embed.json does not describe the pool)."""
    width, pool = outputs.npy_shape(target_files[0])[1], outputs.npy_shape(pool_file)[1]
    if width != pool:
        raise ValueError(
            f"--target: the recorded model gives {width}-dim image embeddings, {embeddings} holds {pool}-dim "
            f"ones ({outputs.name(pool_file)}): {MODEL_FILE} does not describe them"
        )


def embed_targets_task(task: Task) -> int:
    """One part of the targets (an eval-set tar or an image folder) as fp32 unit rows (``.npy``)."""
    part, kind, embedder = task.payload
    _, rows = embedder.embed(iter_images(part, kind), part)
    outputs.save_npy(task.output, rows)
    return len(rows)


def choose_task(task: Task) -> int:
    """Target images per cluster: each target image counts for its nearest centroid."""
    centroids_file, target_files = task.payload
    centroids = np.asarray(outputs.load_npy(centroids_file))
    targets = np.concatenate([outputs.load_npy(f) for f in target_files])
    counts = np.bincount(nearest_centroid(targets, centroids), minlength=len(centroids)).astype(np.int64)
    with outputs.staged(task.output) as tmp, open(tmp, "wb") as f:
        np.savez(f, centroids=centroids, target_images=counts, kept=counts > 0)
    return len(targets)


def write_clusters(output: Location, rule: ImageRule, targets: tuple[str, ...]) -> dict[str, Any]:
    """Beside the keep list: ``STEM_clusters.npz`` (centroids, target images per cluster, kept flags) and
    ``STEM_clusters.json`` (the kept clusters, most-chosen first); returns the json's counts."""
    centroids, counts = load_clusters(rule.clusters)
    outputs.write_bytes(outputs.beside(output, "_clusters.npz"), outputs.read_bytes(rule.clusters))
    kept = np.flatnonzero(counts)
    order = kept[np.argsort(-counts[kept], kind="stable")]
    info = {"clusters": len(centroids), "kept_clusters": len(kept), "target_images": int(counts.sum())}
    chosen = [{"cluster": int(c), "target_images": int(counts[c])} for c in order]
    outputs.write_json(
        outputs.beside(output, "_clusters.json"), {**info, "targets": list(targets), "kept": chosen}
    )
    return info
