"""The input rows of ``data-tools build``, streamed from an image folder or a table of paths/URLs.

A row is where an image comes from (a URL, or a path relative to the input) and its caption. Tables
(CSV, TSV, JSONL, parquet) are read in batches, never whole; a folder is its image files in sorted order,
captioned by a same-name ``.txt`` next to each, or by a ``captions.csv``/``captions.tsv`` table in it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".parquet")
CAPTION_TABLES = ("captions.csv", "captions.tsv")
# Auto-detected column names, in order of preference.
SOURCE_COLUMNS = ("url", "path", "image", "filepath", "file", "image_path")
CAPTION_COLUMNS = ("caption", "text", "title")
MISSING_CAPTION = ("skip", "keep")
"""What `build` does with an image that has no caption (no `.txt`, an empty table cell)."""
_BATCH_ROWS = 4096


@dataclass(frozen=True)
class InputRow:
    """One input image: ``kind`` is ``url`` or ``path`` (relative to ``base`` unless absolute)."""

    kind: str
    source: str
    caption: str
    captions: list[str] | None = None
    """A table cell holding a list: its captions (``caption`` is them one per line), kept in KEY.json."""


@dataclass(frozen=True)
class InputSpec:
    """Where the rows come from: a table (or a folder's captions table) or a folder of images."""

    path: Path
    base: Path
    source_col: str | None = None
    caption_col: str | None = None
    separator: str | None = None
    """A CSV/TSV table's separator; None: by its suffix (a tab for .tsv, else a comma)."""

    @property
    def is_table(self) -> bool:
        return self.path.suffix.lower() in TABLE_SUFFIXES


def resolve_input(
    path: str | Path,
    source_col: str | None = None,
    caption_col: str | None = None,
    separator: str | None = None,
) -> InputSpec:
    """Check the input and pick its columns (given names win over auto-detection)."""
    path = Path(path).resolve()
    if path.is_dir():
        table = next((path / name for name in CAPTION_TABLES if (path / name).is_file()), None)
        if table is None:
            return InputSpec(path, path)
        path = table
    elif not path.is_file():
        raise ValueError(f"input not found: {path}")
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise ValueError(f"input must be a folder or a {'/'.join(TABLE_SUFFIXES)} table, got {path.name}")
    columns = _columns(path, separator)
    source = _pick_column(columns, source_col, SOURCE_COLUMNS, "--url-col", path)
    caption = _pick_column(columns, caption_col, CAPTION_COLUMNS, "--caption-col", path)
    return InputSpec(path, path.parent, source, caption, separator)


def _pick_column(
    columns: list[str], given: str | None, candidates: tuple[str, ...], flag: str, path: Path
) -> str:
    if given is not None:
        if given not in columns:
            raise ValueError(
                f"{flag} {given!r} is not a column of {path.name} (columns: {', '.join(columns)})"
            )
        return given
    lower = {column.lower(): column for column in columns}
    found = next((lower[name] for name in candidates if name in lower), None)
    if found is None:
        raise ValueError(f"no {'/'.join(candidates)} column in {path.name}; name one with {flag}")
    return found


def _columns(path: Path, separator: str | None) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pq.ParquetFile(path).schema_arrow.names
    if suffix == ".jsonl":
        first = next(_jsonl_records(path), None)
        return list(first) if first else []
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f, delimiter=separator or _delimiter(path)), [])


def iter_rows(spec: InputSpec) -> Iterator[InputRow]:
    """Stream the rows in a fixed order (row order of the table; sorted paths for a folder)."""
    if not spec.is_table:
        yield from _folder_rows(spec.path)
        return
    for record in _table_records(spec):
        source = record.get(spec.source_col)
        caption = record.get(spec.caption_col)
        source = "" if source is None else str(source).strip()
        kind = "url" if "://" in source else "path"
        if isinstance(caption, list):  # a parquet list column or a JSONL list: several captions
            captions = [str(c) for c in caption if c is not None and str(c).strip()]
            yield InputRow(kind, source, "\n".join(captions), captions)
        else:
            yield InputRow(kind, source, "" if caption is None else str(caption))


def _table_records(spec: InputSpec) -> Iterator[dict]:
    suffix = spec.path.suffix.lower()
    if suffix == ".parquet":
        columns = list(dict.fromkeys([spec.source_col, spec.caption_col]))
        for batch in pq.ParquetFile(spec.path).iter_batches(batch_size=_BATCH_ROWS, columns=columns):
            yield from batch.to_pylist()
    elif suffix == ".jsonl":
        yield from _jsonl_records(spec.path)
    else:
        with open(spec.path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f, delimiter=spec.separator or _delimiter(spec.path))


def _jsonl_records(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path.name} line {number} is not JSON: {error}") from None


def _delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _folder_rows(folder: Path) -> Iterator[InputRow]:
    """The images under ``folder`` by sorted relative path, each captioned by its ``.txt`` (or empty)."""
    images = sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )
    for relative in images:
        caption_file = (folder / relative).with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        yield InputRow("path", relative, caption)
