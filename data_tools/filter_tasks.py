"""``filter`` as a job of per-shard tasks (see phases.py): the keep list, summary and histogram of filter.py.

Phases, each a list of idempotent tasks over the metadata parquets:

1. ``counts`` (only for ``keep_fraction``): each shard's clip_score counts in the 65,536 quantile bins;
2. ``bin``: each shard's scores inside the one bin that holds the threshold (found from the summed counts);
   sorting those gives the threshold bit for bit as sorting every score would, ties included;
3. ``keep``: each shard's kept uids (parquet), with ``--language`` its samples' languages (parquet), and
   counts (json, the marker);

then rank 0 streams the kept uids into the keep list shard by shard (and the languages into
``STEM_languages.parquet``, in the same order) and writes the summary and histogram. Without an embeddings
folder the tasks are the shards themselves (filter_shards.py): only rules that need no score can run.
Memory: a task holds one shard's metadata; the merge holds the histogram, one shard's uids, and (only
for ``--format datacomp``) all kept uids. Scratch files live in ``FILE_work/`` next to
the keep list, on the same storage (with ``--output s3://…`` on the object store, where every node sees
them), and are removed after the merge.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from data_tools.filter import (
    KEEP_SCHEMA,
    QUANTILE_BINS,
    FilterConfig,
    Tally,
    check_rules,
    filtered_tables,
    input_files,
    keep_list_location,
    kept_uids,
    languages_path,
    pick_threshold,
    quantile_bin,
    quantile_plan,
    read_scores,
    summary_path,
    write_outputs,
)
from data_tools.image_filter import image_rule_job, write_clusters
from data_tools.phases import input_fingerprint, release_scratch, run_phase, settings_key
from data_tools.runner import RunnerOptions, Task
from data_tools.text_filters import IMAGENET, LANGUAGE_SCHEMA, language_rows
from webshards import outputs
from webshards.lineage import write_lineage
from webshards.outputs import Location


def filter_job(
    embeddings: Location | None,
    output: Location,
    cfg: FilterConfig,
    options: RunnerOptions,
    fmt: str = "parquet",
    shard_urls: list[str] | None = None,
) -> dict[str, Any] | None:
    """Write the keep list ``output`` (+ ``.npy`` for datacomp, summary json, histogram png, languages), with
    every pass as runner tasks; returns the summary, or None on ranks other than 0. Without ``embeddings``
    the rows come from the shards ``shard_urls``."""
    from_shards = embeddings is None
    files = _inputs(embeddings, fmt, shard_urls)
    check_rules(cfg, scored=not from_shards)
    output = keep_list_location(output)
    scratch = outputs.beside(output, "_work")
    work = outputs.join(scratch, settings_key({"inputs": input_fingerprint(files)}))
    threshold = _threshold(files, cfg, work, options)
    image_rule = image_rule_job(embeddings, cfg.targets, cfg.clusters, work, options) if cfg.targets else None
    vocabulary = _vocabulary_fingerprint(cfg)
    rules = settings_key(
        {"threshold": repr(threshold), "config": asdict(cfg), "urls": shard_urls, "vocabulary": vocabulary}
    )
    parts = outputs.join(work, f"keep-{rules}")
    payload = (cfg, threshold, None if from_shards else shard_urls, from_shards, image_rule)
    tasks = [
        Task(f"keep:{i}", outputs.join(parts, f"{i:05d}.json"), (p, *payload)) for i, p in enumerate(files)
    ]
    run_phase(tasks, keep_task, options, "filter (keep)", last=True)
    if not options.is_merger:
        release_scratch(scratch, work, options)
        return None
    tally = _merge_parts(tasks, output, cfg)
    summary = write_outputs(output, fmt, tally, cfg, threshold, scored=not from_shards)
    if image_rule is not None:
        summary["image_based"] = write_clusters(output, image_rule, cfg.targets)
        outputs.write_json(summary_path(output), summary)
    release_scratch(scratch, work, options)
    record_lineage(embeddings, output, cfg, options, fmt, shard_urls, summary)
    return summary


def _inputs(embeddings: Location | None, fmt: str, shard_urls: list[str] | None) -> list[Location]:
    """The tasks' inputs: the metadata parquets of ``embeddings``, else the shards themselves."""
    if embeddings is not None:
        return input_files(embeddings, fmt)
    if not shard_urls:
        raise ValueError("filter needs --embeddings DIR or --shards SPEC (caption and size rules only)")
    return list(shard_urls)


def _vocabulary_fingerprint(cfg: FilterConfig) -> Any:
    """The vocabulary file's version, so an edited file gets fresh keep parts (None for none or imagenet)."""
    if cfg.vocabulary is None or cfg.vocabulary == IMAGENET:
        return None
    return outputs.fingerprint(cfg.vocabulary)


def _merge_parts(tasks: list[Task], output: Location, cfg: FilterConfig) -> Tally:
    """Rank 0's merge: the keep list (and the languages, with ``--language``) streamed part by part in shard
    order; returns the summed counts."""
    tally = Tally()
    with outputs.staged(output) as tmp, pq.ParquetWriter(tmp, KEEP_SCHEMA) as writer:
        for task in tasks:
            tally.merge(json.loads(outputs.read_bytes(task.output)))
            writer.write_table(outputs.read_parquet(_uids_file(task.output)))
    if cfg.languages is not None:
        target = languages_path(output)
        with outputs.staged(target) as tmp, pq.ParquetWriter(tmp, LANGUAGE_SCHEMA) as writer:
            for task in tasks:
                writer.write_table(outputs.read_parquet(_languages_file(task.output)))
    return tally


def record_lineage(
    embeddings: Location | None,
    output: Location,
    cfg: FilterConfig,
    options: RunnerOptions,
    fmt: str,
    shard_urls: list[str] | None,
    summary: dict[str, Any],
) -> None:
    """The keep list's lineage (``STEM_lineage.json``): the rules, threshold and counts of the summary."""
    made = {"keep": output, "datacomp": outputs.beside(output, ".npy") if fmt == "datacomp" else None}
    counts = {"samples_in": summary["samples"], "samples_out": summary["kept"],
              "score_threshold": summary["score_threshold"], "removed": summary["failed_rule"]}  # fmt: skip
    if summary["languages"]:
        counts["languages"] = dict(list(summary["languages"].items())[:10])  # the most common ten
    vocabulary = None if cfg.vocabulary in (None, IMAGENET) else cfg.vocabulary
    inputs = {
        "embeddings": embeddings,
        "shards": shard_urls,
        "vocabulary": vocabulary,
        "targets": cfg.targets,
    }
    params = {**asdict(cfg), "format": fmt}
    write_lineage(output, "filter", params=params, inputs=inputs, counts=counts, outputs=made, runner=options)


def _threshold(files: list[Location], cfg: FilterConfig, work: Location, options: RunnerOptions) -> float:
    """The score threshold: given, none, or the exact ``keep_fraction`` quantile from two task phases."""
    if cfg.keep_fraction is None:
        return -math.inf if cfg.min_score is None else cfg.min_score
    tasks = [
        Task(f"counts:{i}", outputs.join(work, f"counts/{i:05d}.npy"), path) for i, path in enumerate(files)
    ]
    run_phase(tasks, counts_task, options, "filter (score counts)")
    counts = np.zeros(QUANTILE_BINS, dtype=np.int64)
    for task in tasks:
        bins, n = outputs.load_npy(task.output)
        np.add.at(counts, bins, n)
    plan = quantile_plan(counts, cfg.keep_fraction)
    if plan is None:
        return math.inf
    folder = outputs.join(work, f"bin-{plan[0]}")
    tasks = [
        Task(f"bin:{i}", outputs.join(folder, f"{i:05d}.npy"), (p, plan[0])) for i, p in enumerate(files)
    ]
    run_phase(tasks, bin_task, options, "filter (threshold bin)")
    return pick_threshold([outputs.load_npy(task.output) for task in tasks], plan)


def counts_task(task: Task) -> int:
    """One shard's non-empty quantile bins and their counts, as a ``(2, bins)`` int64 array."""
    scores = read_scores(task.payload)
    bins, counts = np.unique(quantile_bin(scores), return_counts=True)
    outputs.save_npy(task.output, np.stack([bins, counts]).astype(np.int64))
    return len(scores)


def bin_task(task: Task) -> int:
    """One shard's scores inside the threshold's bin."""
    path, target = task.payload
    scores = read_scores(path)
    outputs.save_npy(task.output, scores[quantile_bin(scores) == target])
    return len(scores)


def keep_task(task: Task) -> int:
    """One shard's kept uids (``.parquet``) and counts (``.json``, written last: the marker)."""
    path, cfg, threshold, urls, from_shards, image_rule = task.payload
    tally = Tally()
    for table, masks in filtered_tables([path], cfg, threshold, urls, from_shards, image_rule):
        kept = kept_uids(table, tally.add(table, masks))
        with outputs.staged(_uids_file(task.output)) as tmp:
            pq.write_table(kept, tmp)
        if cfg.languages is not None:
            with outputs.staged(_languages_file(task.output)) as tmp:
                pq.write_table(language_rows(table), tmp)
    outputs.write_json(task.output, tally.as_dict())
    return tally.samples


def _uids_file(marker: Location) -> Location:
    """The kept uids (``NNNNN.parquet``) beside a keep task's marker (``NNNNN.json``)."""
    return outputs.with_name(marker, outputs.name(marker).removesuffix(".json") + ".parquet")


def _languages_file(marker: Location) -> Location:
    """The samples' languages (``NNNNN.languages.parquet``) beside a keep task's marker."""
    return outputs.with_name(marker, outputs.name(marker).removesuffix(".json") + ".languages.parquet")
