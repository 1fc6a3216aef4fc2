"""``data-tools reshard``: write the samples a keep list selects into new shards of a chosen size.

Several keep lists select their intersection. A uid listed k times is written k times (DataComp-style
upsampling; an intersection takes the smallest count). The kept samples, in input order, form one stream
of known length (counted cheaply from the input parquets first); output shard j is positions
[j·N, (j+1)·N) of that stream, optionally shuffled within fixed windows by a seeded permutation. Each
output shard is thus a pure function of the inputs, so it is a runner task: resumable, spread over
workers and nodes, and a rerun after a kill writes the same bytes.

Input shards, their parquets and the keep lists may be local files or fsspec URLs (``s3://…``): shards are
streamed, parquets and ``.npy`` lists read through ``webshards.outputs``.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_tools.build import remove_stale_temps
from data_tools.runner import RunnerOptions, RunSummary, Task, run_tasks
from webshards import outputs
from webshards.layout import SUCCESS, ShardWriter, iter_shard, key_for, shard_name, stats_name
from webshards.lineage import write_lineage
from webshards.outputs import Location, join
from webshards.samples import image_extension
from webshards.spec import count_samples, expand_urls
from webshards.tasks import check_settings
from webshards.urls import open_url, redact_url

log = logging.getLogger("data_tools")

SELECTION_DIR = ".reshard"  # per input shard: kept keys and their counts, removed when all is written
SETTINGS_FILE = "reshard.json"
_SELECTION_SCHEMA = pa.schema([("key", pa.string()), ("count", pa.int32())])


@dataclass(frozen=True)
class InputShard:
    """One input shard: its tar, its selection file, and where its kept samples start in the stream."""

    tar: Location
    selection: Location
    start: int
    count: int


@dataclass(frozen=True)
class OutputShard:
    """The payload of one output task: stream positions [start, end) with the window shuffle."""

    output: Location
    shard_id: int
    start: int
    end: int
    total: int
    window: int
    seed: int
    index_digits: int
    inputs: tuple[InputShard, ...]


def reshard(
    shards: str,
    keep_files: list[Location],
    output: Location,
    samples_per_shard: int = 10000,
    shuffle_buffer: int = 0,
    seed: int = 0,
    options: RunnerOptions | None = None,
) -> RunSummary:
    """Write the kept samples of ``shards`` into ``output`` (a folder or an fsspec URL such as ``s3://…``);
    returns the run summary of this node. Shards and keep lists, too, are local paths or URLs."""
    if samples_per_shard < 1 or shuffle_buffer < 0:
        raise ValueError("samples_per_shard must be at least 1 and shuffle_buffer at least 0")
    tars = _input_tars(shards)
    keep = load_keep(keep_files)
    output = outputs.resolve(output)
    settings = {"shards": [_setting(t) for t in tars], "keep": [_setting(k) for k in keep_files]}
    settings |= {"samples_per_shard": samples_per_shard, "shuffle_buffer": shuffle_buffer, "seed": seed}
    _check_settings(output, settings)
    inputs = _select(tars, keep, join(output, SELECTION_DIR))
    tasks = plan(output, inputs, samples_per_shard, shuffle_buffer, seed)
    options = options or RunnerOptions()
    summary = run_tasks(tasks, write_output_shard, options, desc="reshard")
    if _finish(output, tasks, inputs):
        _record_lineage(output, shards, keep_files, settings, options, inputs, len(keep))
    return summary


def _record_lineage(
    output: Location,
    shards: str,
    keep_files: list[Location],
    settings: dict[str, Any],
    options: RunnerOptions,
    inputs: list[InputShard],
    uids: int,
) -> None:
    """The output folder's lineage: the settings (inputs apart: they are fingerprinted), samples in and out."""
    params = {key: value for key, value in settings.items() if key not in ("shards", "keep")}
    counts = {"samples_in": count_samples(expand_urls(shards)), "samples_out": sum(s.count for s in inputs),
              "uids_kept": uids}  # fmt: skip
    read = {"shards": shards, "keep": list(keep_files)}
    write_lineage(output, "reshard", params=params, inputs=read, counts=counts, runner=options)


def _input_tars(spec: str) -> list[Location]:
    """The shards of ``spec`` (``Path``s, URLs as text); each must be complete (tar and ``_stats.json``)."""
    tars = [url if outputs.is_remote(url) else Path(url) for url in expand_urls(spec)]
    missing = [
        t for t in tars if not (outputs.exists(t) and outputs.exists(outputs.beside(t, "_stats.json")))
    ]
    if missing:
        raise ValueError(redact_url(f"not a complete shard: {missing[0]} ({len(missing)} of {len(tars)})"))
    return tars


def _setting(location: Location) -> str:
    """How ``reshard.json`` records an input: a local path made absolute, a URL as given (credentials
    hidden, as everything this project logs or saves)."""
    if outputs.is_remote(location):
        return redact_url(str(location))
    return str(Path(location).resolve())


def load_keep(locations: list[Location]) -> Counter[str]:
    """uid -> times to write it; several lists keep only uids in all of them, with the smallest count."""
    if not locations:
        raise ValueError("need at least one keep list")
    kept: Counter[str] | None = None
    for location in locations:
        counts = Counter(_read_uids(location))
        kept = counts if kept is None else kept & counts  # Counter & is the min count of common keys
    return kept


def _read_uids(location: Location) -> Iterator[str]:
    """The uids of a keep list (a path or URL): a parquet ``uid`` column, read in batches, or a DataComp
    ``.npy`` of u8,u8 pairs."""
    shown = redact_url(str(location))
    if not outputs.exists(location):
        raise ValueError(f"keep list not found: {shown}")
    if outputs.name(location).endswith(".npy"):
        pairs = outputs.load_npy(location)
        for high, low in zip(pairs[pairs.dtype.names[0]], pairs[pairs.dtype.names[1]]):
            yield f"{int(high):016x}{int(low):016x}"
        return
    with open_url(str(location)) as stream:
        parquet = pq.ParquetFile(stream)
        if "uid" not in parquet.schema_arrow.names:
            raise ValueError(f"keep list {shown} has no uid column")
        for batch in parquet.iter_batches(columns=["uid"], batch_size=65536):
            yield from batch.column(0).to_pylist()


def _select(tars: list[Location], keep: Counter[str], folder: Location) -> list[InputShard]:
    """Save each input shard's kept keys with counts; returns the shards with their stream offsets."""
    inputs, start = [], 0
    for index, tar in enumerate(tars):
        keys, counts = [], []
        for key, uid in _successful_samples(tar):
            if keep.get(uid, 0) > 0:
                keys.append(key)
                counts.append(keep[uid])
        selection = join(folder, f"{index:05d}.parquet")
        outputs.write_parquet(selection, pa.table({"key": keys, "count": counts}, schema=_SELECTION_SCHEMA))
        inputs.append(InputShard(tar, selection, start, sum(counts)))
        start += sum(counts)
    return inputs


def _successful_samples(tar: Location) -> Iterator[tuple[str, str]]:
    """(key, uid) of the samples in a shard: from its parquet when there is one, else from the tar."""
    parquet = outputs.beside(tar, ".parquet")
    if outputs.exists(parquet):
        table = outputs.read_parquet(parquet, columns=["key", "uid", "status"])
        for key, uid, status in zip(*(table.column(c).to_pylist() for c in ("key", "uid", "status"))):
            if status == SUCCESS:
                yield key, uid
        return
    with open_url(str(tar)) as stream:
        for sample in iter_shard(stream):
            yield sample["__key__"], sample["json"]["uid"]


def _check_settings(output: Location, settings: dict[str, Any]) -> None:
    """Refuse to resume into a folder written with other inputs or settings (its plan would differ)."""
    if not check_settings(join(output, SETTINGS_FILE), settings, "a reshard"):
        outputs.write_json(join(output, SETTINGS_FILE), settings)


def plan(
    output: Location, inputs: list[InputShard], samples_per_shard: int, shuffle_buffer: int, seed: int
) -> list[Task]:
    """One task per output shard, each with the input shards its stream positions come from."""
    total = sum(shard.count for shard in inputs)
    window = max(1, shuffle_buffer)
    digits = max(4, len(str(samples_per_shard - 1)))
    tasks = []
    for shard_id, start in enumerate(range(0, total, samples_per_shard)):
        end = min(start + samples_per_shard, total)
        low, high = start // window * window, min(-(-end // window) * window, total)
        needed = tuple(s for s in inputs if s.count and s.start < high and s.start + s.count > low)
        job = OutputShard(output, shard_id, start, end, total, window, seed, digits, needed)
        name = shard_name(shard_id)
        tasks.append(Task(name=name, output=join(output, stats_name(name)), payload=job))
    return tasks


def source_positions(start: int, end: int, total: int, window: int, seed: int) -> list[int]:
    """The kept-stream positions written at output positions [start, end): a seeded shuffle per window."""
    if window == 1:
        return list(range(start, end))
    sources = []
    for first in range(start // window * window, end, window):
        size = min(window, total - first)
        permutation = np.random.default_rng([seed, first // window]).permutation(size) + first
        sources.extend(permutation[max(start, first) - first : min(end, first + size) - first].tolist())
    return sources


def write_output_shard(task: Task) -> int:
    """Runner task: stream the needed input samples and write them in output order; returns the count."""
    job: OutputShard = task.payload
    remove_stale_temps(job.output, task.name)
    sources = source_positions(job.start, job.end, job.total, job.window, job.seed)
    stream = _kept_stream(job.inputs, min(sources), max(sources) + 1)
    wanted, buffer = set(sources), {}
    with outputs.shard_writer(job.output, job.shard_id) as writer:
        for index, source in enumerate(sources):
            while source not in buffer:  # read on; a window's samples wait in the buffer
                position, sample = next(stream)
                if position in wanted:
                    buffer[position] = sample
            _add(writer, key_for(job.shard_id, index, job.index_digits), buffer.pop(source))
    return len(sources)


def _kept_stream(inputs: tuple[InputShard, ...], low: int, high: int) -> Iterator[tuple[int, dict]]:
    """(stream position, sample) for positions [low, high): kept samples, each repeated per its count."""
    for shard in inputs:
        if shard.start + shard.count <= low or shard.start >= high:
            continue
        table = outputs.read_parquet(shard.selection)
        counts = dict(zip(table.column("key").to_pylist(), table.column("count").to_pylist()))
        position = shard.start
        with open_url(str(shard.tar)) as stream:  # streamed: a remote tar is never downloaded whole
            for sample in iter_shard(stream):
                for _ in range(counts.get(sample["__key__"], 0)):
                    if low <= position < high:
                        yield position, sample
                    position += 1
                if position >= high:
                    return


def _add(writer: ShardWriter, key: str, sample: dict) -> None:
    """Copy a sample under a new key: its image bytes, caption, extra members and KEY.json fields."""
    ext = image_extension(sample)
    reserved = {"__key__", "__url__", ext, "txt", "json"}
    extras = {name: data for name, data in sample.items() if name not in reserved}
    writer.add(key, sample[ext], sample["txt"], sample["json"], ext=ext, extras=extras)


def _finish(output: Location, tasks: list[Task], inputs: list[InputShard]) -> bool:
    """Once every output shard is complete: write sizes.json and drop the selection files; returns whether
    it was (this process then writes the lineage)."""
    if not outputs.write_sizes_when_complete(output, [task.output for task in tasks]):
        return False
    for shard in inputs:
        outputs.remove(shard.selection)
    if not outputs.is_remote(output):
        with contextlib.suppress(OSError):
            (output / SELECTION_DIR).rmdir()
    return True
