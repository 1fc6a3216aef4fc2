"""The merge of decontamination (rank 0): the keep list, report.json and a picture of example pairs.

``keep.parquet`` holds the uids of every compared training item that matched no eval image (the layout
``filter`` and ``dedup`` write, so ``reshard --keep`` takes it), streamed shard by shard. ``report.json``
says per eval set how many of its images have a duplicate in the training data and how many training
items were removed because of them, with example pairs that name both images well enough to fetch them
(eval set root, its shard and key; training shard URL, key and uid).
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from data_tools.decontam.evalimages import FOLDER, EvalIndex, EvalSource, image_of
from data_tools.dedup.groups import KEEP_SCHEMA
from webshards import outputs
from webshards.layout import iter_shard
from webshards.outputs import Location
from webshards.samples import image_extension
from webshards.urls import open_url

log = logging.getLogger("data_tools")

SCORE_NAME = {"exact": "distance", "perceptual": "distance", "semantic": "similarity"}
PICTURE_PAIRS = 6
THUMB = 128


def write_keep(output: Location, items: list[Location], pair_files: list[Location]) -> tuple[pa.Table, int]:
    """Write ``keep.parquet``; returns every pair (with its training ``shard``) and the items compared."""
    tables, total = [], 0
    with (
        outputs.staged(outputs.join(output, "keep.parquet")) as tmp,
        pq.ParquetWriter(tmp, KEEP_SCHEMA) as keep,
    ):
        for shard, (table_file, pair_file) in enumerate(zip(items, pair_files)):
            uids = outputs.read_parquet(table_file, ["uid"])["uid"]
            pairs = outputs.read_parquet(pair_file)
            removed = np.zeros(len(uids), dtype=bool)
            removed[pairs["row"].to_numpy()] = True
            keep.write_table(pa.table({"uid": uids.filter(pa.array(~removed))}, schema=KEEP_SCHEMA))
            tables.append(pairs.append_column("shard", pa.array(np.full(pairs.num_rows, shard, np.int64))))
            total += len(uids)
    return pa.concat_tables(tables) if tables else pa.table({}), total


def set_reports(
    sources: list[EvalSource], index: EvalIndex, pairs: pa.Table, urls: list[str], method: str, examples: int
) -> list[dict[str, Any]]:
    """Per eval set: images, those with a duplicate in training, their fraction, training items removed
    because of them, and up to ``examples`` pairs (the closest first, one per eval image)."""
    evals = pairs["eval"].to_numpy() if pairs.num_rows else np.zeros(0, np.int64)
    set_of_pair = index.set_id[evals]
    reports = []
    for number, source in enumerate(sources):
        mine = np.flatnonzero(set_of_pair == number)
        images = int((index.set_id == number).sum())
        found = len(np.unique(evals[mine]))
        training = pairs.take(mine)
        removed = len({(s, r) for s, r in zip(training["shard"].to_pylist(), training["row"].to_pylist())})
        reports.append(
            {
                "root": source.root,
                "kind": source.kind,
                "images": images,
                "images_in_training": found,
                "fraction_in_training": round(found / images, 6) if images else 0.0,
                "training_removed": removed,
                "examples": _examples(source, index, training, urls, method, examples),
            }
        )
    return reports


def _examples(
    source: EvalSource, index: EvalIndex, pairs: pa.Table, urls: list[str], method: str, limit: int
) -> list[dict[str, Any]]:
    """The closest pair of each eval image, closest first, up to ``limit``."""
    scores = pairs["score"].to_numpy()
    order = np.argsort(-scores if method == "semantic" else scores, kind="stable")
    _, first = np.unique(pairs["eval"].to_numpy()[order], return_index=True)
    chosen = order[np.sort(first)][:limit]
    rows = pairs.take(chosen).to_pylist()
    return [
        {
            "eval": _eval_ref(source, index, row["eval"]),
            "train": {"shard": urls[row["shard"]], "key": row["key"], "uid": row["uid"]},
            SCORE_NAME[method]: round(float(row["score"]), 4),
        }
        for row in rows
    ]


def _eval_ref(source: EvalSource, index: EvalIndex, number: int) -> dict[str, str]:
    """Where eval image ``number`` is: the set's root and its shard and key (a folder: the file path)."""
    key = str(index.keys[number])
    if source.kind == FOLDER:
        return {"root": source.root, "path": str(outputs.join(source.parts[0], key)), "key": key}
    return {"root": source.root, "shard": _part_url(source, index, number), "key": key}


def _part_url(source: EvalSource, index: EvalIndex, number: int) -> str:
    """The shard URL of eval image ``number`` (its part numbered over all sets)."""
    first = int(np.flatnonzero(index.set_id == index.set_id[number])[0])
    first_part = int(index.part_id[first])
    return source.parts[int(index.part_id[number]) - first_part]


def write_picture(output: Location, reports: list[dict[str, Any]], sources: list[EvalSource]) -> int:
    """``examples.png``: the first example pairs side by side (eval image left, training image right);
    returns how many pairs it shows (none: no file)."""
    picks = [(e, source) for r, source in zip(reports, sources) for e in r["examples"]][:PICTURE_PAIRS]
    tiles = [t for t in (_pair_tile(example, source) for example, source in picks) if t is not None]
    if not tiles:
        return 0
    sheet = Image.new("RGB", (2 * THUMB + 12, len(tiles) * (THUMB + 20)), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (0, i * (THUMB + 20)))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    outputs.write_bytes(outputs.join(output, "examples.png"), buffer.getvalue())
    return len(tiles)


def _pair_tile(example: dict[str, Any], source: EvalSource) -> Image.Image | None:
    ref, train = example["eval"], example["train"]
    left = image_of(ref.get("shard") or source.parts[0], source.kind, ref["key"])
    right = _training_image(train["shard"], train["key"])
    if left is None or right is None:
        return None
    tile = Image.new("RGB", (2 * THUMB + 12, THUMB + 20), "white")
    for x, data in ((0, left), (THUMB + 12, right)):
        with Image.open(io.BytesIO(data)) as image:
            scale = THUMB / max(image.size)  # small eval images are enlarged to be seen
            thumb = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)))
            tile.paste(thumb, (x, 0))
    score = ", ".join(f"{k} {v}" for k, v in example.items() if k not in ("eval", "train"))
    ImageDraw.Draw(tile).text((2, THUMB + 4), f"{ref['key']} ~ {train['key']}: {score}", fill="black")
    return tile


def _training_image(url: str, key: str) -> bytes | None:
    try:
        with open_url(url) as stream:
            for sample in iter_shard(stream, decode=False):
                ext = image_extension(sample)
                if sample["__key__"] == key and ext is not None:
                    return sample[ext]
    except OSError as error:
        log.warning("decontaminate: cannot read %s for examples.png (%s)", url, error)
    return None
