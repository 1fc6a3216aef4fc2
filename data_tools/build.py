"""``data-tools build``: turn raw image-text pairs into WebDataset shards in the img2dataset layout.

Input rows go to shards by row order (shard id = row index // samples_per_shard), so the output depends
only on the input and the settings, never on workers or nodes. A first pass streams the input once and
writes each pending shard's rows to a small hidden file; then each shard is one runner task that fetches,
resizes and writes its images. Complete shards are skipped on a rerun; a failed image is a parquet row
with its status, never a crashed job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from data_tools.images import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    FetchError,
    ImageConfig,
    ResizeError,
    fetch,
    pixel_limit,
    process,
)
from data_tools.inputs import MISSING_CAPTION, InputRow, InputSpec, iter_rows, resolve_input
from data_tools.runner import RunnerOptions, RunSummary, Task, owns, run_tasks
from webshards import outputs
from webshards.layout import SUCCESS, ShardWriter, key_for, make_uid, shard_name, stats_name
from webshards.lineage import write_lineage
from webshards.outputs import Location, join
from webshards.tasks import check_settings

log = logging.getLogger("data_tools")

ROWS_DIR = ".build"  # per-shard input rows, removed once the shard is complete
SETTINGS_FILE = "build.json"
_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)  # the warning is an error in a task
_ROWS_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("source", pa.string()),
        ("caption", pa.string()),
        ("captions", pa.list_(pa.string())),
    ]
)


@dataclass(frozen=True)
class FetchConfig:
    """How images are read; changes neither which rows go where nor the stored bytes."""

    threads: int = 8
    """Images fetched and resized at once inside one shard task."""
    timeout: float = 10.0
    """Seconds before a URL download is abandoned."""
    retries: int = 2
    """Extra attempts for a URL after a transient error, with exponential backoff."""
    max_bytes: int = MAX_IMAGE_BYTES
    """A download stops past this many bytes and the row is failed_to_download."""
    max_pixels: int = MAX_IMAGE_PIXELS
    """An image declaring more pixels is failed_to_decode before it is decoded (decompression bombs)."""


@dataclass(frozen=True)
class ShardJob:
    """The payload of one shard task: everything writing the shard needs."""

    output: Location
    shard_id: int
    rows_file: Location
    base: Path
    index_digits: int
    image: ImageConfig
    fetching: FetchConfig
    keep_missing_caption: bool = False
    """Store an image without a caption (empty caption) instead of recording it as `missing_caption`."""


def build(
    input_path: str | Path,
    output: Location,
    samples_per_shard: int = 10000,
    image: ImageConfig | None = None,
    fetching: FetchConfig | None = None,
    source_col: str | None = None,
    caption_col: str | None = None,
    options: RunnerOptions | None = None,
    missing_caption: str = "skip",
    separator: str | None = None,
) -> RunSummary:
    """Build shards from ``input_path`` into ``output`` (a folder or an fsspec URL such as ``s3://…``);
    returns the run summary of this node. An image without a caption is a `missing_caption` row (``skip``)
    or stored with an empty caption (``keep``). ``separator``: a CSV/TSV table's (None: by its suffix)."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if missing_caption not in MISSING_CAPTION:
        raise ValueError(f"missing_caption must be one of {MISSING_CAPTION}, got {missing_caption!r}")
    image, fetching = image or ImageConfig(), fetching or FetchConfig()
    spec = resolve_input(input_path, source_col, caption_col, separator)
    output = outputs.resolve(output)
    outputs.make_folder(output)
    settings = {**_settings(spec, samples_per_shard, image), "missing_caption": missing_caption}
    _check_settings(output, settings)
    options = options or RunnerOptions()
    shards = _split_rows(spec, output, samples_per_shard, *options.ranks())
    digits = max(4, len(str(samples_per_shard - 1)))
    keep = missing_caption == "keep"
    tasks = [_task(output, i, spec.base, digits, image, fetching, keep) for i in range(shards)]
    summary = run_tasks(tasks, write_shard, options, desc="build")
    if _finish(output, tasks):
        params = {**settings, "fetching": dataclasses.asdict(fetching)}
        write_lineage(output, "build", params=params, inputs={"input": spec.path}, counts=_counts(output),
                      runner=options)  # fmt: skip
    return summary


def _counts(output: Location) -> dict[str, Any]:
    """Input rows in, samples out, and the rows of each failure status."""
    rows = outputs.status_counts(output)
    failed = {status: n for status, n in rows.items() if status != SUCCESS and n}
    return {"samples_in": sum(rows.values()), "samples_out": rows[SUCCESS], "failed": failed}


def _settings(spec: InputSpec, samples_per_shard: int, image: ImageConfig) -> dict[str, Any]:
    """What the output depends on, so a rerun into the same folder cannot mix two builds."""
    columns = {"source_col": spec.source_col, "caption_col": spec.caption_col}
    if spec.separator is not None:  # only when given: earlier builds' settings stay as they were
        columns["separator"] = spec.separator
    return {
        "input": str(spec.path),
        **columns,
        "samples_per_shard": samples_per_shard,
        **dataclasses.asdict(image),
    }


def _check_settings(output: Location, settings: dict[str, Any]) -> None:
    if not check_settings(join(output, SETTINGS_FILE), settings, "a build"):
        outputs.write_json(join(output, SETTINGS_FILE), settings)


def _split_rows(spec: InputSpec, output: Location, samples_per_shard: int, rank: int, world: int) -> int:
    """Stream the input once, saving the rows of this node's pending shards; returns the shard count."""
    rows = iter_rows(spec)
    shard_id = 0
    while chunk := list(islice(rows, samples_per_shard)):
        if owns(shard_id, rank, world) and not outputs.exists(join(output, stats_name(shard_name(shard_id)))):
            _write_rows(_rows_file(output, shard_id), chunk)
        shard_id += 1
    if shard_id == 0:
        raise ValueError(f"no input rows found in {spec.path}")
    return shard_id


def _rows_file(output: Location, shard_id: int) -> Location:
    return join(output, f"{ROWS_DIR}/{shard_name(shard_id)}.parquet")


def _write_rows(path: Location, rows: list[InputRow]) -> None:
    """Save a shard's input rows whole (a killed run never leaves half a file)."""
    table = pa.Table.from_pylist([dataclasses.asdict(row) for row in rows], schema=_ROWS_SCHEMA)
    outputs.write_parquet(path, table)


def _task(
    output: Location,
    shard_id: int,
    base: Path,
    digits: int,
    image: ImageConfig,
    fetching: FetchConfig,
    keep_missing_caption: bool,
) -> Task:
    name = shard_name(shard_id)
    rows_file = _rows_file(output, shard_id)
    job = ShardJob(output, shard_id, rows_file, base, digits, image, fetching, keep_missing_caption)
    return Task(name=name, output=join(output, stats_name(name)), payload=job)


def write_shard(task: Task) -> int:
    """Runner task: fetch and resize a shard's images and write the shard; returns the rows processed."""
    job: ShardJob = task.payload
    rows = [InputRow(**r) for r in outputs.read_parquet(job.rows_file).to_pylist()]
    remove_stale_temps(job.output, task.name)
    with (
        pixel_limit(job.fetching.max_pixels),
        ThreadPoolExecutor(job.fetching.threads) as pool,
        outputs.shard_writer(job.output, job.shard_id) as writer,
    ):
        results = _in_order(pool, lambda row: _load(row, job), rows, window=4 * job.fetching.threads)
        for index, (row, result) in enumerate(zip(rows, results)):
            _add(writer, key_for(job.shard_id, index, job.index_digits), row, result)
    outputs.remove(job.rows_file)
    return len(rows)


def _in_order(pool: ThreadPoolExecutor, fn: Callable, items: list, window: int) -> Iterator:
    """``fn`` over ``items`` in order with at most ``window`` in flight, so a shard is never all in memory."""
    in_flight: deque[Future] = deque()
    for item in items:
        in_flight.append(pool.submit(fn, item))
        if len(in_flight) >= window:
            yield in_flight.popleft().result()
    while in_flight:
        yield in_flight.popleft().result()


def remove_stale_temps(folder: Location, name: str) -> None:
    """Remove temp files a killed writer of shard ``name`` left (only its one owner writes a shard); a
    remote shard is staged in a local temp folder and leaves none."""
    if outputs.is_remote(folder):
        return
    for pattern in (f".{name}.*.tmp", f".{name}_stats.json.*.tmp"):
        for stale in folder.glob(pattern):
            stale.unlink(missing_ok=True)


def _load(row: InputRow, job: ShardJob) -> tuple[bytes, int, int] | tuple[str, str]:
    """The stored bytes and original size of a row's image, or its failure (status, message)."""
    if not row.caption.strip() and not job.keep_missing_caption:  # checked first: nothing is downloaded
        return "missing_caption", "no caption (--missing-caption keep stores the image with an empty one)"
    if not row.source:
        return "failed_to_download", "empty source"
    location = row.source if row.kind == "url" else str(job.base / row.source)
    try:
        data = fetch(location, job.fetching.timeout, job.fetching.retries, job.fetching.max_bytes)
    except FetchError as error:
        return "failed_to_download", str(error)
    try:
        return process(data, job.image)
    except ResizeError as error:
        return "failed_to_resize", str(error)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, *_BOMB) as error:
        # PIL names the in-memory buffer's address; drop it so reruns write the same parquet bytes
        return "failed_to_decode", _ADDRESS.sub("", f"{type(error).__name__}: {error}")


def _add(writer: ShardWriter, key: str, row: InputRow, result: tuple) -> None:
    uid = make_uid(row.source, row.caption)
    source = {row.kind: row.source}
    if len(result) == 2:
        status, message = result
        writer.add_failure(key, uid, row.caption, status, message, source)
        return
    data, width, height = result
    meta = {**source, "uid": uid, "original_width": width, "original_height": height}
    if row.captions is not None:  # several captions: `data.text_key=json:captions` draws one per epoch
        meta["captions"] = row.captions
    writer.add(key, data, row.caption, meta)


def _finish(output: Location, tasks: list[Task]) -> bool:
    """Drop leftover row files of complete shards; write sizes.json once every shard is complete (returns
    whether it did: this process then writes the lineage)."""
    for task in tasks:
        if outputs.exists(task.output):
            outputs.remove(task.payload.rows_file)
    if not outputs.is_remote(output):
        with contextlib.suppress(OSError):  # not empty: other nodes' shards are still pending
            (output / ROWS_DIR).rmdir()
    return outputs.write_sizes_when_complete(output, [task.output for task in tasks])
