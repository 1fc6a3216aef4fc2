"""Eval-set decontamination: remove the training pairs whose image duplicates an image of an eval set.

Eval sets are small, training pools huge, so the job is two phases on the one runner (phases.py):

1. ``index``: one task per eval part (shard, or plain folder) computes its images' features
   (evalimages.py): dedup's sha256 of the bytes (exact), pHash (perceptual), or an embedding by the
   training embeddings' model (semantic, embedder.py);
2. ``match``: one task per training shard loads the whole index (once per process) and writes the shard's
   pairs with eval images (matching.py);
3. merge (rank 0): ``keep.parquet``, ``report.json`` and ``examples.png`` (report.py).

Scratch files (index and pairs) live in ``DIR/decontam-work/`` and are removed after the merge; the training
hashes stay in ``DIR/features/`` (dedup's layout), to be reused by a rerun with another threshold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from data_tools.decontam.embedder import EvalEmbedder
from data_tools.decontam.evalimages import EvalSource, index_task, load_index, open_eval_set
from data_tools.decontam.matching import MatchJob, items_files, match_task
from data_tools.decontam.report import set_reports, write_keep, write_picture
from data_tools.dedup.perceptual import DEFAULT_THRESHOLD
from data_tools.dedup.semantic import DEFAULT_EPS
from data_tools.embeddings import metadata_files, shard_index
from data_tools.phases import input_fingerprint, release_scratch, run_phase, settings_key
from data_tools.runner import RunnerOptions, Task
from webshards import outputs
from webshards.lineage import write_lineage
from webshards.outputs import Location

METHODS = ("exact", "perceptual", "semantic")
SCRATCH = "decontam-work"
DEFAULT_SIMILARITY = 1.0 - DEFAULT_EPS


@dataclass(frozen=True)
class DecontamConfig:
    """How training images are compared with eval images."""

    method: str
    threshold: float | None = None
    """perceptual: most Hamming bits apart (dedup's default, 10); semantic: least cosine similarity (0.95,
    dedup's 1 - eps); exact: unused (the bytes are identical)."""
    examples: int = 10
    """Example pairs per eval set in the report."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "perceptual" and not 0 <= self.value <= 32:
            raise ValueError(f"perceptual threshold must be 0..32 bits, got {self.threshold}")
        if self.method == "semantic" and not -1.0 <= self.value < 1.0:
            raise ValueError(f"semantic threshold is a cosine similarity in [-1, 1), got {self.threshold}")
        if self.examples < 0:
            raise ValueError(f"examples must be at least 0, got {self.examples}")

    @property
    def value(self) -> float:
        """The threshold in effect."""
        if self.method == "perceptual":
            return float(DEFAULT_THRESHOLD if self.threshold is None else int(self.threshold))
        if self.method == "semantic":
            return DEFAULT_SIMILARITY if self.threshold is None else float(self.threshold)
        return 0.0


def decontaminate(
    output: Location,
    shard_urls: list[str],
    eval_roots: list[str],
    cfg: DecontamConfig,
    options: RunnerOptions,
    embeddings: Location | None = None,
    embedder: EvalEmbedder | None = None,
) -> dict[str, Any] | None:
    """Write ``output``/keep.parquet, report.json (and examples.png when pairs were found); returns the
    report on rank 0, None on the other ranks."""
    start = time.perf_counter()
    if not shard_urls:
        raise ValueError("--shards matched no shards")
    if cfg.method == "semantic" and (embeddings is None or embedder is None):
        raise ValueError("--method semantic needs --embeddings DIR (from data-tools embed)")
    sources = [open_eval_set(str(root)) for root in eval_roots]
    if cfg.method == "semantic":
        _check_embedded(embeddings, shard_urls)
    outputs.make_folder(output)
    parts = [(s, part, source.kind) for s, source in enumerate(sources) for part in source.parts]
    settings = {"method": cfg.method, "threshold": cfg.value, "urls": shard_urls, "embedder": str(embedder),
                "eval": input_fingerprint([part for _, part, _ in parts])}  # fmt: skip
    scratch = outputs.join(output, SCRATCH)
    work = outputs.join(scratch, settings_key(settings))
    index_tasks = [
        Task(
            f"index:{s}:{j}",
            outputs.join(work, f"index/{s:03d}-{j:05d}.npz"),
            (part, kind, cfg.method, embedder),
        )
        for j, (s, part, kind) in enumerate(parts)
    ]
    run_phase(index_tasks, index_task, options, "decontaminate (index)")
    job = MatchJob(cfg.method, cfg.value, tuple(t.output for t in index_tasks), tuple(s for s, _, _ in parts))
    items = items_files(output, cfg.method, len(shard_urls), embeddings)
    match_tasks = [
        Task(f"match:{i}", outputs.join(work, f"pairs/{i:05d}.parquet"), (i, url, items[i], job))
        for i, url in enumerate(shard_urls)
    ]
    run_phase(match_tasks, match_task, options, "decontaminate (match)", last=True)
    report = None
    if options.is_merger:
        report = _merge(output, sources, job, [t.output for t in match_tasks], items, shard_urls, cfg)
        report["seconds"] = round(time.perf_counter() - start, 3)
        outputs.write_json(outputs.join(output, "report.json"), report)
    release_scratch(scratch, work, options)
    if report is not None:
        record_lineage(output, shard_urls, eval_roots, embeddings, cfg, options, report)
    return report


def record_lineage(
    output: Location,
    shard_urls: list[str],
    eval_roots: list[str],
    embeddings: Location | None,
    cfg: DecontamConfig,
    options: RunnerOptions,
    report: dict[str, Any],
) -> None:
    """The output folder's lineage: the eval sets (inputs), training items removed, eval images found."""
    found = {s["root"]: s["images_in_training"] for s in report["eval_sets"]}
    counts = {"samples_in": report["items"], "samples_out": report["kept"], "removed": report["removed"],
              "eval_images": report["eval_images"], "eval_images_in_training": found}  # fmt: skip
    inputs = {"shards": shard_urls, "eval_sets": list(eval_roots), "embeddings": embeddings}
    params = {"method": cfg.method, "threshold": None if cfg.method == "exact" else cfg.value}
    made = {"keep": outputs.join(output, "keep.parquet")}
    write_lineage(output, "decontaminate", params=params, inputs=inputs, counts=counts, outputs=made,
                  runner=options)  # fmt: skip


def _check_embedded(embeddings: Location, shard_urls: list[str]) -> None:
    """Every training shard must have its embeddings (embed's shard ``i`` is the ``i``-th of the spec)."""
    done = {shard_index(f) for f in metadata_files(embeddings)}
    missing = [i for i in range(len(shard_urls)) if i not in done]
    if missing:
        raise ValueError(
            f"{embeddings} has no embeddings of shard {missing[0]} ({shard_urls[missing[0]]}): embed the same "
            f"--shards first ({len(missing)} of {len(shard_urls)} missing)"
        )


def _merge(
    output: Location,
    sources: list[EvalSource],
    job: MatchJob,
    pair_files: list[Location],
    items: list[tuple[Location, Location]],
    urls: list[str],
    cfg: DecontamConfig,
) -> dict[str, Any]:
    """keep.parquet, the report's content and examples.png."""
    pairs, compared = write_keep(output, [table for table, _ in items], pair_files)
    index = load_index(job.index_files, job.set_ids)
    sets = set_reports(sources, index, pairs, urls, cfg.method, cfg.examples)
    removed = len({(s, r) for s, r in zip(pairs["shard"].to_pylist(), pairs["row"].to_pylist())})
    pictured = write_picture(output, sets, sources)
    return {
        "method": cfg.method,
        "threshold": cfg.value,
        "items": compared,
        "removed": removed,
        "kept": compared - removed,
        "eval_images": len(index.keys),
        "eval_images_in_training": sum(s["images_in_training"] for s in sets),
        "eval_sets": sets,
        "examples_png": pictured,
    }


__all__ = ["METHODS", "DecontamConfig", "decontaminate"]
