"""`data.train` a table of image paths and captions (.csv/.tsv/.parquet/.jsonl, open_clip's `--train-data
x.csv`): the run's first start turns it into shards with `data-tools build`, into
`{run}/table_shards/{table name}-{path hash}/`, and the run trains on those, so a table run resumes exactly like
any shard run. A resume (or a restart after a crash mid-build) reuses them: complete shards are never rebuilt.

The build runs as the `data-tools build` command, not by import: pretrain stands beside data_tools, not on it
(`tests/webshards/test_layering.py`), and the command is exactly what a person would run by hand, so the two
train the same. Only rank 0 builds; the others wait for it and learn of a failure.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pretrain.config import Config, ConfigError, DataConfig
from pretrain.parallel.distributed import gather_objects
from webshards.atomic import write_json_atomic
from webshards.fingerprints import file_record

log = logging.getLogger("pretrain")

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl")
SHARDS_DIR = "table_shards"
TABLE_FILE = "table.json"  # the table the shards were built from, and its content's fingerprint (sha256)
MAX_SAMPLES_PER_SHARD = 10000  # data-tools build's default
LIST_FIELD = "captions"  # KEY.json field data-tools build writes a list cell's captions to


def is_table(train: str) -> bool:
    """Whether `data.train` names one local table rather than shards (or `synthetic`)."""
    return "::" not in train and "://" not in train and Path(train).suffix.lower() in TABLE_SUFFIXES


def shards_dir(run_dir: Path, table: str) -> Path:
    """Where a run's shards of `table` are built: one folder per table (ZSCL's reference data may be one too,
    perhaps of the same name in another folder), named by the table and a hash of its absolute path."""
    where = hashlib.sha256(str(Path(table).resolve()).encode()).hexdigest()[:8]
    return Path(run_dir) / SHARDS_DIR / f"{Path(table).stem}-{where}"


def table_data(cfg: Config, is_main: bool) -> DataConfig:
    """`cfg.data` reading the shards built from its table (built here by rank 0 on the run's first start); a
    caption column of lists switches the default text key to the list (`json:captions`)."""
    data, table = cfg.data, Path(cfg.data.train)
    outcome: str | None = None
    if is_main:
        try:
            _ensure_shards(data, table, shards_dir(cfg.run_dir, data.train))
        except (ValueError, OSError) as e:
            outcome = str(e)
    outcome = gather_objects(outcome)[0]  # every rank learns of rank 0's failure, none waits for ever
    if outcome is not None:
        raise ValueError(outcome)
    text_key = data.text_key
    if text_key == DataConfig.text_key and _holds_lists(table, data.table_caption_key):
        text_key = f"json:{LIST_FIELD}"
        if is_main:
            log.info(
                "data: %s holds lists of captions: one drawn per sample per epoch (%s)", table.name, text_key
            )
    return dataclasses.replace(data, train=str(shards_dir(cfg.run_dir, data.train)), text_key=text_key)


def _ensure_shards(data: DataConfig, table: Path, folder: Path) -> None:
    """Build the table's shards into `folder` unless a build there is complete (then only warn when the table
    changed since: the run keeps training on the shards it started on)."""
    if not table.is_file():
        raise ValueError(f"data.train: table not found: {table}")
    separator = separator_of(table, data.table_separator)
    columns = table_columns(table, separator)
    for key in ("table_image_key", "table_caption_key"):
        column = getattr(data, key)
        if column not in columns:
            raise ConfigError(f"data.{key}: no column {column!r} in {table} (columns: {', '.join(columns)})")
    digest = file_record("table", table)["fingerprint"]  # the lineage's fingerprint of a file: its sha256
    if (folder / "sizes.json").is_file():
        built = json.loads((folder / TABLE_FILE).read_text()) if (folder / TABLE_FILE).is_file() else {}
        if built.get("sha256") != digest:
            log.warning("data: %s changed since %s was built from it; training continues on those shards "
                        "(delete the folder to rebuild)", table, folder)  # fmt: skip
        log.info("data: training on the shards built from %s at the run's first start: %s", table, folder)
        return
    per_shard = data.table_samples_per_shard or _samples_per_shard(table)
    log.info(
        "data: building shards from %s into %s (data-tools build, %d rows per shard)",
        table,
        folder,
        per_shard,
    )
    # what it is built from, first: a restart mid-build knows it too
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / TABLE_FILE, {"table": str(table.resolve()), "sha256": digest})
    _run_build(table, folder, data, separator, per_shard)


def _run_build(table: Path, folder: Path, data: DataConfig, separator: str | None, per_shard: int) -> None:
    args = [
        sys.executable, "-m", "data_tools.cli", "build", "--input", str(table), "--output", str(folder),
        "--url-col", data.table_image_key, "--caption-col", data.table_caption_key,
        "--samples-per-shard", str(per_shard),
        "--rank", "0", "--world", "1",  # all of it here: not the share torchrun's RANK/WORLD_SIZE would pick
    ]  # fmt: skip
    if separator is not None:
        args += ["--separator", separator]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise ValueError(
            f"data.train: building shards from {table} failed: {lines[-1] if lines else done.returncode}"
        )


def separator_of(table: Path, separator: str | None) -> str | None:
    """A .csv/.tsv table's separator: the given one, else a tab if its header line has one (open_clip's
    default), else a comma; None for parquet and JSONL."""
    if table.suffix.lower() not in (".csv", ".tsv"):
        return None
    if separator is not None:
        return separator
    with open(table, encoding="utf-8") as f:
        return "\t" if "\t" in f.readline() else ","


def table_columns(table: Path, separator: str | None) -> list[str]:
    suffix = table.suffix.lower()
    if suffix == ".parquet":
        return pq.read_schema(table).names
    with open(table, newline="", encoding="utf-8") as f:
        if suffix == ".jsonl":
            first = next((line for line in f if line.strip()), "{}")
            return list(json.loads(first))
        return next(csv.reader(f, delimiter=separator or ","), [])


def _holds_lists(table: Path, column: str) -> bool:
    """Whether the caption column holds lists: a parquet list column, or a list in a JSONL table's first row."""
    suffix = table.suffix.lower()
    if suffix == ".parquet":
        kind = pq.read_schema(table).field(column).type
        return pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if suffix == ".jsonl":
        with open(table, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "{}")
        return isinstance(json.loads(first).get(column), list)
    return False


def _samples_per_shard(table: Path) -> int:
    """Rows per shard giving at least 64 shards (any ranks x workers dividing 64 can read them whole),
    at most data-tools build's 10000."""
    if table.suffix.lower() == ".parquet":
        rows = pq.ParquetFile(table).metadata.num_rows
    else:
        with open(table, "rb") as f:
            rows = sum(1 for _ in f) - (table.suffix.lower() != ".jsonl")
    return max(1, min(MAX_SAMPLES_PER_SHARD, math.ceil(rows / 64)))
