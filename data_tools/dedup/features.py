"""The per-shard stage of exact and perceptual dedup: one small parquet of hashes per input shard.

Hashing reads and decodes every image, so it is the expensive part; it runs as runner tasks (a process
pool, resumable: a rerun reuses complete shards' hashes). Grouping then reads only these small columns.
Samples without an image (or whose image cannot be decoded, for pHash) are left out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_tools.dedup.exact import DIGEST_BYTES, sample_digest
from data_tools.dedup.perceptual import phash64
from data_tools.phases import run_phase
from data_tools.runner import RunnerOptions, Task
from webshards import outputs
from webshards.layout import iter_shard
from webshards.outputs import Location
from webshards.samples import image_extension
from webshards.urls import open_url

log = logging.getLogger("data_tools")

FEATURE_COLUMN = {"exact": "digest", "perceptual": "phash"}


@dataclass(frozen=True)
class FeatureJob:
    """What one shard's task computes: the method's hash, and whether the caption is part of it."""

    method: str
    with_caption: bool = False

    @property
    def folder_name(self) -> str:
        return f"{self.method}-caption" if self.with_caption else self.method


def feature_files(output: Location, job: FeatureJob, count: int) -> list[Location]:
    """Where the hashes of the ``count`` input shards go, in shard order (under the output, local or URL)."""
    return [outputs.join(output, f"features/{job.folder_name}/{i:05d}.parquet") for i in range(count)]


def run_features(
    urls: list[str], output: Location, job: FeatureJob, options: RunnerOptions
) -> list[Location]:
    """Hash every shard not hashed yet, as the first phase of a dedup job (under a rank split it waits for
    the other ranks); returns the feature files in shard order (all complete)."""
    files = feature_files(output, job, len(urls))
    tasks = [Task(f"{i}:{url}", path, (url, job)) for i, (url, path) in enumerate(zip(urls, files))]
    run_phase(tasks, hash_shard, options, f"hash ({job.method})")
    return files


def hash_shard(task: Task) -> int:
    """The runner task: key, uid, caption, pixels and the hash of every sample of one shard."""
    url, job = task.payload
    rows: dict[str, list] = {"key": [], "uid": [], "caption": [], "pixels": [], "feature": []}
    with open_url(url) as stream:
        for sample in iter_shard(stream, decode=False):
            feature = _feature(sample, job)
            if feature is None:
                continue
            meta = _json(sample)
            rows["key"].append(meta.get("key", sample["__key__"]))
            rows["uid"].append(meta.get("uid"))
            rows["caption"].append(_caption(sample))
            rows["pixels"].append(int(meta.get("width") or 0) * int(meta.get("height") or 0))
            rows["feature"].append(feature)
    with outputs.staged(task.output) as tmp:
        pq.write_table(_table(rows, job), tmp)
    return len(rows["key"])


def _feature(sample: dict, job: FeatureJob) -> bytes | int | None:
    ext = image_extension(sample)
    if ext is None:
        log.warning("dedup: %s has no image, left out", sample["__key__"])
        return None
    image = sample[ext]
    if job.method == "exact":
        return sample_digest(image, _caption(sample) if job.with_caption else None)
    try:
        return phash64(image)
    except (OSError, SyntaxError, ValueError) as error:
        log.warning("dedup: cannot decode %s (%s), left out", sample["__key__"], error)
        return None


def _json(sample: dict) -> dict:
    try:
        return json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return {}


def _caption(sample: dict) -> str:
    return sample.get("txt", b"").decode("utf-8", errors="replace")


def _table(rows: dict[str, list], job: FeatureJob) -> pa.Table:
    if job.method == "exact":
        feature = pa.array(rows["feature"], type=pa.binary(DIGEST_BYTES))
    else:
        feature = pa.array(rows["feature"], type=pa.uint64())
    columns = {name: rows[name] for name in ("key", "uid", "caption")}
    return pa.table(
        {**columns, "pixels": pa.array(rows["pixels"], pa.int64()), FEATURE_COLUMN[job.method]: feature}
    )


def read_features(files: list[Location], method: str) -> tuple[np.ndarray, np.ndarray]:
    """The hash column of all shards (``(n, 32)`` uint8 digests or ``(n,)`` uint64) and pixels per item."""
    column = FEATURE_COLUMN[method]
    tables = [outputs.read_parquet(path, [column, "pixels"]) for path in files]
    pixels = np.concatenate([t["pixels"].to_numpy() for t in tables]) if tables else np.zeros(0, np.int64)
    if method == "exact":
        digests = [fixed_binary(t[column].combine_chunks()) for t in tables]
        return np.concatenate(digests or [np.zeros((0, DIGEST_BYTES), np.uint8)]), pixels
    hashes = [t[column].to_numpy() for t in tables]
    return (np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)), pixels


def fixed_binary(array: pa.FixedSizeBinaryArray) -> np.ndarray:
    """The rows of a fixed-size binary column as a ``(n, width)`` uint8 array, without Python objects."""
    width = array.type.byte_width
    data = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    return data[array.offset * width : (array.offset + len(array)) * width].reshape(-1, width)


def iter_tables(files: list[Location]) -> Iterator[pa.Table]:
    """The key/uid/caption tables of the shards, one at a time, in item order."""
    return (outputs.read_parquet(path, ["key", "uid", "caption"]) for path in files)
