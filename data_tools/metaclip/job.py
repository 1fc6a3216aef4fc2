"""``metaclip`` as task phases (see data_tools/phases.py) on the one runner:

1. ``match`` (per input shard): the uid and caption of every sample, the ids of the entries each caption
   contains; writes the matched rows (``uid`` + ``entries``, a list of ids) and, as its marker, the
   shard's per-entry counts and totals;
2. ``count`` (one task): sums every shard's counts into the pool's per-entry counts (``counts.npy``) and
   the totals (pool size, matched, no uid);
3. ``draw`` (per shard): each matched row's balancing draws against the global counts (balance.py); writes
   the kept uids and, as its marker, the kept pairs per entry;

then rank 0 streams the kept uids into the keep list shard by shard and writes the entry-count report and
plot (report.py). Phases 1-2 depend on the inputs and entries only, so a rerun with another ``t`` or
seed reuses them; phase 3 lives in a folder named by ``t`` and the seed. Scratch files sit in
``FILE_work/`` beside the keep list, on the same storage (``s3://…`` too), and are removed after the merge.
Memory: a task holds one shard's rows and the per-entry counts (8 bytes per entry); the merge holds the
per-entry counts and one shard's kept uids.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_tools.filter import KEEP_SCHEMA, keep_list_location
from data_tools.metaclip.balance import entry_probabilities, expected_kept, keep_rows, uid_keys
from data_tools.metaclip.config import MetaclipConfig
from data_tools.metaclip.entries import cached_matcher, entry_keys, read_entries
from data_tools.metaclip.inputs import input_versions, iter_pairs
from data_tools.metaclip.report import write_report
from data_tools.phases import release_scratch, run_phase, settings_key
from data_tools.runner import RunnerOptions, Task
from webshards import outputs
from webshards.lineage import write_lineage
from webshards.outputs import Location

MATCH_SCHEMA = pa.schema([("uid", pa.string()), ("entries", pa.list_(pa.int32()))])


def metaclip_job(
    inputs: list[str], output: Location, cfg: MetaclipConfig, options: RunnerOptions
) -> dict[str, Any] | None:
    """Write the keep list ``output`` and its ``_entry_counts.json`` / ``.png`` from the shards (or metadata
    parquets) ``inputs``; returns the report's totals on rank 0, None on the other ranks."""
    entries = read_entries(cfg.entries)
    output = keep_list_location(output)
    scratch = outputs.beside(output, "_work")
    source = {"inputs": input_versions(inputs), "entries": entries.digest, "match": cfg.match}
    work = outputs.join(scratch, settings_key(source))
    ref = (str(outputs.resolve(cfg.entries)), entries.digest)  # absolute: Ray workers run elsewhere
    match_tasks = [
        Task(f"match:{i}", outputs.join(work, f"match/{i:05d}.json"), (url, *ref, cfg.match))
        for i, url in enumerate(inputs)
    ]
    run_phase(match_tasks, match_task, options, "metaclip (match)")
    markers = [task.output for task in match_tasks]
    count = Task("count", outputs.join(work, "counts.npy"), (markers, len(entries.names)))
    run_phase([count], count_task, options, "metaclip (count)")
    folder = outputs.join(work, f"draw-{settings_key({'t': cfg.t, 'seed': cfg.seed})}")
    draw_tasks = [
        Task(f"draw:{i}", outputs.join(folder, f"{i:05d}.json"), (m, count.output, *ref, cfg.t, cfg.seed))
        for i, m in enumerate(markers)
    ]
    run_phase(draw_tasks, draw_task, options, "metaclip (draw)", last=True)
    if not options.is_merger:
        release_scratch(scratch, work, options)
        return None
    kept = merge(output, [task.output for task in draw_tasks], len(entries.names))
    pool = json.loads(outputs.read_bytes(outputs.with_name(count.output, "totals.json")))
    report = write_report(output, entries, cfg, outputs.load_npy(count.output), {**pool, **kept})
    release_scratch(scratch, work, options)
    record_lineage(inputs, output, cfg, options, report)
    return report


def record_lineage(
    inputs: list[str], output: Location, cfg: MetaclipConfig, options: RunnerOptions, report: dict[str, Any]
) -> None:
    """The keep list's lineage: the entries file and the pool (shards, or the embeddings folder whose
    metadata parquets were read), t and the match rule, pairs matched and kept."""
    parquets = inputs and all(str(i).endswith(".parquet") for i in inputs)
    pool = {"embeddings": str(inputs[0]).rsplit("/", 2)[0]} if parquets else {}  # DIR of DIR/metadata/x
    read = {**pool, "shards": None if parquets else inputs, "entries": cfg.entries}
    counts = {"samples_in": report["pool"], "samples_out": report["kept"]}
    counts |= {key: report[key] for key in ("matched", "entries", "entries_matched", "head_entries")}
    params = {"t": cfg.t, "seed": cfg.seed, "match": cfg.match}
    write_lineage(output, "metaclip", params=params, inputs=read, counts=counts, runner=options)


def match_task(task: Task) -> int:
    """One shard's matched rows (``.parquet``) and per-entry counts and totals (``.json``, the marker)."""
    url, entries, digest, mode = task.payload
    matcher = cached_matcher(entries, digest, mode)
    uids, matched, samples, no_uid = [], [], 0, 0
    for uid, caption in iter_pairs(url):
        samples += 1
        if uid is None:
            no_uid += 1
            continue
        ids = matcher.match(caption)
        if ids:
            uids.append(uid)
            matched.append(ids)
    with outputs.staged(_rows_file(task.output)) as tmp:
        pq.write_table(pa.table({"uid": uids, "entries": matched}, schema=MATCH_SCHEMA), tmp)
    flat = np.fromiter((i for ids in matched for i in ids), dtype=np.int64)
    ids, counts = np.unique(flat, return_counts=True)
    totals = {"samples": samples, "no_uid": no_uid, "matched": len(uids)}
    outputs.write_json(task.output, {**totals, "ids": ids.tolist(), "counts": counts.tolist()})
    return samples


def count_task(task: Task) -> int:
    """The pool's per-entry counts: every shard's counts summed (``counts.npy``, after ``totals.json``)."""
    markers, size = task.payload
    counts = np.zeros(size, dtype=np.int64)
    totals = {"samples": 0, "no_uid": 0, "matched": 0}
    for marker in markers:
        shard = json.loads(outputs.read_bytes(marker))
        np.add.at(counts, np.asarray(shard["ids"], dtype=np.int64), np.asarray(shard["counts"], np.int64))
        totals = {key: value + shard[key] for key, value in totals.items()}
    outputs.write_json(outputs.with_name(task.output, "totals.json"), totals)
    outputs.save_npy(task.output, counts)
    return totals["samples"]


def draw_task(task: Task) -> int:
    """One shard's kept uids (``.parquet``) and kept pairs per entry (``.json``, the marker)."""
    marker, counts_file, entries, digest, t, seed = task.payload
    rows = outputs.read_parquet(_rows_file(marker))
    column = rows["entries"].combine_chunks()
    lengths = column.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    ids = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    uids = rows["uid"].to_pylist()
    prob = entry_probabilities(outputs.load_npy(counts_file), t)
    keep = keep_rows(lengths, ids, uid_keys(uids, seed), entry_keys(entries, digest), prob)
    kept_ids, kept_counts = np.unique(ids[np.repeat(keep, lengths)], return_counts=True)
    with outputs.staged(_rows_file(task.output)) as tmp:
        pq.write_table(pa.table({"uid": rows["uid"].filter(pa.array(keep))}, schema=KEEP_SCHEMA), tmp)
    shard = {"kept": int(keep.sum()), "expected_kept": expected_kept(lengths, ids, prob)}
    outputs.write_json(task.output, {**shard, "ids": kept_ids.tolist(), "counts": kept_counts.tolist()})
    return len(uids)


def merge(output: Location, markers: list[Location], size: int) -> dict[str, Any]:
    """Stream every shard's kept uids into the keep list, in shard order; the kept pairs per entry
    (``after``) and the kept totals, summed over the shards."""
    after = np.zeros(size, dtype=np.int64)
    totals = {"kept": 0, "expected_kept": 0.0}
    with outputs.staged(output) as tmp, pq.ParquetWriter(tmp, KEEP_SCHEMA) as writer:
        for marker in markers:
            shard = json.loads(outputs.read_bytes(marker))
            writer.write_table(outputs.read_parquet(_rows_file(marker)))
            np.add.at(after, np.asarray(shard["ids"], np.int64), np.asarray(shard["counts"], np.int64))
            totals = {key: value + shard[key] for key, value in totals.items()}
    return {**totals, "after": after}


def _rows_file(marker: Location) -> Location:
    """The rows (``NNNNN.parquet``) beside a task's marker (``NNNNN.json``)."""
    return outputs.with_name(marker, outputs.name(marker).removesuffix(".json") + ".parquet")
