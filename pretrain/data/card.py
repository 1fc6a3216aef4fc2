"""The run's data card (`{run}/data_card.json`): which shards training read and how they were made.

For each `::`-joined source of `data.train`: its spec (credentials redacted), weight, shard and sample
counts and the fingerprint of its shard list (`webshards.fingerprints`: names, tar sizes, sample counts),
with the ids of the curation stages whose lineage sits in its shards' folders; every stage of those chains
is kept once under `ancestors` (the layout of a `lineage.json`, `webshards.lineage`). Synthetic data says so.

Rank 0 writes it once, when the run directory is prepared. A resume keeps it; when the shards differ from
those the run started on, it warns and appends the new sources under `changed_on_resume`, so the card never
claims the run saw only the first data.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from typing import Any

from pretrain.data.tables import is_table, shards_dir
from webshards.atomic import write_json_atomic
from webshards.lineage import FORMAT, describe_input
from webshards.spec import expand_sources
from webshards.urls import redact_url

log = logging.getLogger("pretrain")

CARD_FILE = "data_card.json"


def data_card(train: str, weights: list[float] | None = None) -> dict[str, Any]:
    """The data card of a `data.train` value (a shard spec or `synthetic`)."""
    if train == "synthetic":
        return {"format": FORMAT, "synthetic": True, "sources": [], "ancestors": {}}
    ancestors: dict[str, dict[str, Any]] = {}
    parts = [s.strip() for s in train.split("::") if s.strip()]
    sources = []
    for i, (part, urls) in enumerate(zip(parts, expand_sources(train))):
        record = describe_input("train", urls, ancestors)
        record["location"] = redact_url(part)
        record["weight"] = 1.0 if weights is None else float(weights[i])
        sources.append(record)
    return {"format": FORMAT, "synthetic": False, "sources": sources, "ancestors": ancestors}


def record_data_card(
    train: str, weights: list[float] | None, run_dir: Path, resumed: bool = False
) -> dict[str, Any]:
    """Write `run_dir/data_card.json` at the start of a run, or check the one a resumed run has (see the
    module docstring); returns the card as written. A resumed run without one (it began before data cards)
    gets one marked `recorded_on_resume`: what the steps before read is not known."""
    if is_table(train):  # the shards built from it, whose lineage names the table
        card = {**data_card(str(shards_dir(run_dir, train)), weights), "table": train}
    else:
        card = data_card(train, weights)
    path = Path(run_dir) / CARD_FILE
    if not path.exists():
        card = {**card, "recorded_on_resume": True} if resumed else card
        write_json_atomic(path, card)
        return card
    first = json.loads(path.read_text())
    if fingerprints(first) == fingerprints(card) or fingerprints(card) in [
        fingerprints(c) for c in first.get("changed_on_resume", [])
    ]:
        return first
    log.warning("%s: the training data differ from those the run started on; recorded under changed_on_resume",
                path)  # fmt: skip
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    first.setdefault("changed_on_resume", []).append({"at": now, "sources": card["sources"]})
    for key, stage in card["ancestors"].items():
        first.setdefault("ancestors", {}).setdefault(key, stage)
    write_json_atomic(path, first)
    return first


def fingerprints(card: dict[str, Any]) -> list[str | None]:
    """The fingerprint of each source of a card (or of a `changed_on_resume` entry)."""
    return [source.get("fingerprint") for source in card.get("sources", [])]
