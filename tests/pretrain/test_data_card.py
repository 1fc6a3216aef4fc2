"""The data card: a run on curated shards records what it read and how it was made; export carries it and the
model card's "Training data" section; push uploads both. Fingerprints are computed here from the files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import cli_output, shards_fingerprint, train_in_process

from data_tools.reshard import reshard
from pretrain.data.card import CARD_FILE, data_card, record_data_card
from pretrain.publish.data_card import NOT_RECORDED, training_data_section
from webshards.demo_data import write_demo_data


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every other sample of 32 demo samples, resharded: a chain of two stages (demo-data, reshard)."""
    root = tmp_path_factory.mktemp("curated")
    write_demo_data(root / "demo", samples=32, eval_samples=0, image_size=16, samples_per_shard=16, workers=1)
    uids = [
        u
        for p in sorted((root / "demo/train").glob("*.parquet"))
        for u in pq.read_table(p)["uid"].to_pylist()
    ]
    pq.write_table(pa.table({"uid": uids[::2]}), root / "keep.parquet")
    reshard(str(root / "demo/train/{00000..00001}.tar"), [root / "keep.parquet"], root / "curated", 8)
    return root


def test_a_run_records_its_shards_and_export_and_push_carry_the_card(curated: Path, tmp_path: Path, capsys):
    shards = curated / "curated"
    run = train_in_process(tmp_path, [f"data.train={shards}", "train.steps=2", "train.batch_size=8"])
    card = json.loads((run / CARD_FILE).read_text())
    (source,) = card["sources"]
    assert source["fingerprint"] == shards_fingerprint(shards) and (source["shards"], source["samples"]) == (
        2,
        16,
    )
    lineage = json.loads((shards / "lineage.json").read_text())
    assert source["parents"] == [lineage["stage"]["id"]] and source["matches_parent"]
    assert sorted(s["name"] for s in card["ancestors"].values()) == ["demo-data", "reshard"]

    export = tmp_path / "export"
    cli_output(["export", "--checkpoint", str(run), "--output", str(export)], capsys)
    assert (export / CARD_FILE).read_bytes() == (run / CARD_FILE).read_bytes()
    section = (export / "README.md").read_text().split("## Training data\n", 1)[1].split("\n## ", 1)[0]
    assert f"`{shards}`: 2 shards, 16 samples" in section and source["fingerprint"][:23] in section
    assert "1. **demo-data**: 32 samples" in section and "2. **reshard**: 32 -> 16 samples" in section

    listed = cli_output(
        ["push", "--export", str(export), "--to", f"file://{tmp_path}/pushed", "--dry-run"], capsys
    )
    assert CARD_FILE in listed and "README.md" in listed
    cli_output(["push", "--export", str(export), "--to", f"file://{tmp_path}/pushed"], capsys)
    for name in (CARD_FILE, "README.md"):
        assert (tmp_path / "pushed" / name).read_bytes() == (export / name).read_bytes()


def test_a_resume_on_other_shards_is_recorded_not_hidden(curated: Path, tmp_path: Path, caplog) -> None:
    first, other = str(curated / "curated"), str(curated / "demo" / "train")
    record_data_card(first, None, tmp_path)
    assert record_data_card(first, None, tmp_path) == json.loads((tmp_path / CARD_FILE).read_text())
    with caplog.at_level(logging.WARNING, logger="pretrain"):
        card = record_data_card(other, None, tmp_path)
    assert "differ from those the run started on" in caplog.text
    assert card["sources"][0]["fingerprint"] == shards_fingerprint(Path(first))  # the first stays first
    (change,) = card["changed_on_resume"]
    assert change["sources"][0]["fingerprint"] == shards_fingerprint(Path(other))
    assert record_data_card(other, None, tmp_path) == card  # the same change is recorded once
    older = tmp_path / "older"  # a run begun before data cards, resumed
    assert record_data_card(first, None, older, resumed=True)["recorded_on_resume"] is True
    assert "Recorded when the run resumed" in training_data_section(
        json.loads((older / CARD_FILE).read_text())
    )


def test_synthetic_and_missing_cards_say_so() -> None:
    assert data_card("synthetic") == {"format": 1, "synthetic": True, "sources": [], "ancestors": {}}
    assert "Synthetic data" in training_data_section(data_card("synthetic"))
    assert training_data_section(None) == NOT_RECORDED and "not recorded" in NOT_RECORDED
