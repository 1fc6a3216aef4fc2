"""`data.train` a table of image paths and captions (open_clip_train's `--train-data x.csv`): the run builds
shards from it with `data-tools build` and trains exactly as on shards a person built from the same table;
a resume reuses them; open_clip_train's CsvDataset reads the same pairs; a missing column is one line."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY, read_jsonl, refused, train_in_process, train_runs, write_image_folder
from safetensors.torch import load_file

from data_tools.cli import main as data_tools
from pretrain.data.tables import separator_of, table_columns

ROWS = 16
PER_SHARD = 4
TRAIN = ["train.steps=4", "train.batch_size=4", "data.shuffle_buffer=4"]


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> Path:
    """t.csv (tab-separated, as open_clip's CSVs), c.csv (commas) and lists.parquet (three captions a row)
    over 16 images in images/, paths relative to the tables' folder."""
    root = tmp_path_factory.mktemp("tables")
    names = write_image_folder(root / "images", ROWS, corrupt=False)
    paths = [f"images/{n}" for n in names]
    (root / "t.csv").write_text(
        "filepath\ttitle\n" + "".join(f"{p}\ta photo, number {i}\n" for i, p in enumerate(paths))
    )
    (root / "c.csv").write_text(
        "filepath,title\n" + "".join(f'{p},"a photo, number {i}"\n' for i, p in enumerate(paths))
    )
    lists = [[f"photo {i}", f"picture {i}", f"image {i}"] for i in range(ROWS)]
    pq.write_table(pa.table({"filepath": paths, "title": lists}), root / "lists.parquet")
    return root


def same_training(a: Path, b: Path) -> None:
    keys = ("step", "samples_seen", "loss", "data_skipped")
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [{k: r.get(k) for k in keys} for r in ma] == [{k: r.get(k) for k in keys} for r in mb]
    final = "checkpoints/step_00000004/model.safetensors"
    wa, wb = load_file(a / final), load_file(b / final)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def train_on_table(root: Path, table: Path, name: str, *extra: str) -> Path:
    return train_in_process(root, [f"data.train={table}", f"data.table_samples_per_shard={PER_SHARD}",
                                   "checkpoint.every=2", *TRAIN, *extra], name=name)  # fmt: skip


@pytest.fixture(scope="module")
def parquet_run(tables, tmp_path_factory) -> Path:
    """Four steps on lists.parquet, unbroken."""
    return train_on_table(tmp_path_factory.mktemp("parquet"), tables / "lists.parquet", "straight")


@pytest.fixture(scope="module")
def csv_run(tables, tmp_path_factory) -> Path:
    """Four steps on t.csv."""
    return train_on_table(tmp_path_factory.mktemp("csv"), tables / "t.csv", "table")


@pytest.mark.parametrize("table, build_args, text_key", [("t.csv", ["--separator", "\\t"], "txt"),
                                                         ("lists.parquet", [], "json:captions")])  # fmt: skip
def test_a_table_trains_as_the_shards_data_tools_builds_from_it(
    tables, parquet_run, csv_run, tmp_path, table, build_args, text_key
):
    run = parquet_run if table == "lists.parquet" else csv_run
    shards = tmp_path / "built"
    assert data_tools(["build", "--input", str(tables / table), "--output", str(shards), "--url-col", "filepath",
                       "--caption-col", "title", "--samples-per-shard", str(PER_SHARD), *build_args]) == 0  # fmt: skip
    by_hand = train_in_process(
        tmp_path, [f"data.train={shards}", f"data.text_key={text_key}", *TRAIN], name="by-hand"
    )
    same_training(run, by_hand)
    assert read_jsonl(run / "metrics.jsonl")[-1]["data_skipped"] == 0
    card = json.loads((run / "data_card.json").read_text())
    assert card["table"] == str(tables / table) and card["sources"][0]["samples"] == ROWS


def test_the_separator_is_a_tab_when_the_header_has_one_else_a_comma(tables):
    assert separator_of(tables / "t.csv", None) == "\t" and separator_of(tables / "c.csv", None) == ","
    assert (
        table_columns(tables / "c.csv", ",") == table_columns(tables / "t.csv", "\t") == ["filepath", "title"]
    )
    assert separator_of(tables / "c.csv", ";") == ";" and separator_of(tables / "lists.parquet", None) is None


def test_open_clip_reads_the_same_pairs_from_the_table(tables, csv_run):
    """open_clip_train's CsvDataset (tab-separated by default) and the shards the run trained on agree, row by
    row, on image path and caption."""
    from open_clip_train.data import CsvDataset

    reference = CsvDataset(str(tables / "t.csv"), None, "filepath", "title")
    pairs = []
    (built,) = (csv_run / "table_shards").iterdir()
    for shard in sorted(built.glob("*.tar")):
        with tarfile.open(shard) as tar:
            pairs += [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert [(p["path"], p["caption"]) for p in pairs] == list(zip(reference.images, reference.captions))


def test_a_resumed_table_run_reuses_its_shards_and_equals_an_unbroken_one(
    tables, parquet_run, tmp_path, caplog
):
    train_on_table(tmp_path, tables / "lists.parquet", "resumed", "train.steps=2")
    caplog.set_level("INFO", logger="pretrain")
    caplog.clear()
    resumed = train_on_table(tmp_path, tables / "lists.parquet", "resumed", "resume=latest")
    assert "training on the shards built from" in caplog.text and "building shards" not in caplog.text
    same_training(parquet_run, resumed)


@pytest.mark.parametrize("key", ["table_caption_key", "table_image_key"])
def test_a_missing_column_is_one_line_naming_the_file_and_the_key(tables, tmp_path, capsys, key):
    table = tables / "t.csv"
    args = [
        "train",
        "--config",
        str(TINY),
        f"run.dir={tmp_path}",
        f"data.train={table}",
        f"data.{key}=caption",
    ]
    line = refused(args, capsys, not_made=tmp_path / "tiny")
    assert line == (f"pretrain: error: data.{key}: no column 'caption' in {table} (columns: filepath, title)")


@pytest.mark.slow
def test_two_ranks_train_on_a_table_as_one(tables, tmp_path):
    """Rank 0 builds the shards while rank 1 waits; 2 ranks x batch 2 then equal 1 rank x batch 4 (the same
    canonical partitions), several captions drawn alike."""
    args = [f"data.train={tables / 'lists.parquet'}", f"data.table_samples_per_shard={PER_SHARD}", "data.partitions=2",
            "checkpoint.every=2", "train.steps=4", "data.shuffle_buffer=4"]  # fmt: skip
    one = train_in_process(tmp_path, [*args, "train.batch_size=4"], name="one")
    train_runs(
        [{"train": [f"run.dir={tmp_path}", "run.name=two", "log.every=1", *args, "train.batch_size=2"]}]
    )
    losses = [
        [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
        for run in (one, tmp_path / "two")
    ]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    final = "checkpoints/step_00000004/model.safetensors"
    wa, wb = load_file(one / final), load_file(tmp_path / "two" / final)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
