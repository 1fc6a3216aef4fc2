"""Reading what the curation stages wrote, for the report: summaries, counts, examples and distributions.

Every reader takes the files as their writers leave them (filter's ``STEM_summary.json``, dedup's and
decontaminate's ``report.json``, reshard's ``reshard.json`` + ``sizes.json``, ``STEM_languages.parquet``,
MetaCLIP's ``STEM_entry_counts.json``, ``lineage.json``) and is lenient about what it does not need: a file
that is absent gives None, a field of another shape is left out, so a stage that grows its outputs does not
break the page. A file that is there but not JSON is a ValueError naming it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from data_tools.report.tiles import Tile
from webshards import outputs
from webshards.outputs import Location

"""Where a filter summary may hold its counts per language."""


@dataclass(frozen=True)
class Stage:
    """One row of the counts table: a stage, where its output is, samples in and out, and notes."""

    name: str
    where: str
    samples: int | None
    kept: int | None
    notes: str = ""


def read_json(location: Location) -> Any | None:
    """A JSON file, or None when it is not there."""
    if not outputs.exists(location):
        return None
    try:
        return json.loads(outputs.read_bytes(location))
    except ValueError as error:
        raise ValueError(f"{location}: not JSON ({error})") from None


def _number(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def filter_stage(keep_list: Location, summary: dict[str, Any]) -> Stage:
    removed = summary.get("failed_rule") or {}
    notes = ", ".join(f"{rule}: {n:,} fail" for rule, n in removed.items() if _number(n) is not None)
    return Stage(
        "filter", str(keep_list), _number(summary.get("samples")), _number(summary.get("kept")), notes
    )


def dedup_stage(folder: Location, report: dict[str, Any]) -> Stage:
    notes = f"{report.get('method', '?')}: {report.get('groups', '?')} groups, {report.get('removed', '?')} removed"
    return Stage("dedup", str(folder), _number(report.get("items")), _number(report.get("kept")), notes)


def keep_list_stage(name: str, keep_list: Location, summary: dict[str, Any] | None) -> Stage:
    """A stage known by its keep list (its row count) and, when there, a summary with ``samples``."""
    kept = outputs.parquet_rows(keep_list) if outputs.exists(keep_list) else None
    summary = summary or {}
    scalars = {k: v for k, v in summary.items() if _number(v) is not None and k not in ("samples", "kept")}
    notes = ", ".join(f"{k}: {v}" for k, v in list(scalars.items())[:4])
    return Stage(
        name, str(keep_list), _number(summary.get("samples")), _number(summary.get("kept", kept)), notes
    )


def report_stage(name: str, folder: Location, report: dict[str, Any]) -> Stage:
    """A stage from a ``report.json`` of counts (decontaminate): its item and kept counts, where named so."""
    samples = next((_number(report[k]) for k in ("items", "samples", "checked") if k in report), None)
    kept = _number(report.get("kept"))
    removed = _number(report.get("removed"))
    return Stage(name, str(folder), samples, kept, "" if removed is None else f"{removed:,} removed")


def reshard_stage(folder: Location) -> Stage | None:
    """Resharded output: its samples from ``sizes.json`` (None when the folder has neither file)."""
    settings = read_json(outputs.join(folder, "reshard.json"))
    sizes = read_json(outputs.join(folder, "sizes.json"))
    if settings is None and sizes is None:
        return None
    total = sum(sizes.values()) if isinstance(sizes, dict) else None
    keeps = (settings or {}).get("keep") or []
    notes = f"{len(sizes or {})} shards" + (f", from {len(keeps)} keep list(s)" if keeps else "")
    return Stage("reshard", str(folder), None, total, notes)


def lineage_files(locations: list[Location]) -> Iterator[tuple[Location, Any]]:
    """``lineage.json`` in each output folder and ``STEM_lineage.json`` beside each keep list, where present."""
    for location in locations:
        name = outputs.name(location)
        candidate = outputs.beside(location, "_lineage.json") if name.endswith(".parquet") else None
        candidate = candidate or outputs.join(location, "lineage.json")
        lineage = read_json(candidate)
        if lineage is not None:
            yield candidate, lineage


def dedup_groups(report: dict[str, Any], per_group: int) -> list[list[Tile]]:
    """The example groups of a dedup ``report.json``: the kept member first, then removed ones."""
    rows = []
    for example in report.get("examples") or []:
        members = [m for m in example.get("members") or [] if isinstance(m, dict) and m.get("key")]
        kept = [m["key"] for m in members if m.get("keep")]
        members.sort(key=lambda m: not m.get("keep"))
        tiles = []
        for member in members[:per_group]:
            state = "kept" if member.get("keep") else "removed"
            label = "kept" if state == "kept" else f"removed: duplicate of {kept[0] if kept else '?'}"
            tiles.append(
                Tile(member["key"], member.get("caption") or "", state, [label], uid=member.get("uid"))
            )
        rows.append(tiles)
    return rows


def language_counts(summary: dict[str, Any]) -> Counter[str] | None:
    """Samples per language, as a filter with ``--language`` counts them in its summary; None without."""
    found = summary.get("languages")
    return Counter(found) if found else None


def entry_counts(keep_list: Location) -> tuple[list[tuple[str, int, int]], int] | None:
    """MetaCLIP's ``STEM_entry_counts.json`` beside a keep list (data_tools/metaclip/report.py writes it): its
    (entry, matched, kept) rows, most matched first, and ``t``; None when there is no such file."""
    data = read_json(outputs.beside(keep_list, "_entry_counts.json"))
    if not isinstance(data, dict) or not isinstance(data.get("entry_counts"), dict):
        return None
    rows = [(str(e), int(c["before"]), int(c["after"])) for e, c in data["entry_counts"].items()]
    return sorted(rows, key=lambda r: (-r[1], r[0])), int(data["t"])


def decontam_pairs(report: dict[str, Any], per_group: int) -> list[tuple[str, list[list[Tile]]]]:
    """Per eval set of a decontaminate ``report.json`` (data_tools/decontam/report.py writes it): its root and
    up to ``per_group`` example pairs (eval sample, training sample)."""
    return [
        (str(info["root"]), [_pair(example) for example in info["examples"][:per_group]])
        for info in report.get("eval_sets", [])
    ]


def _pair(example: dict[str, Any]) -> list[Tile]:
    """An example pair as two tiles: the eval image (in an eval shard, or a file of an image folder) and the
    training sample, labelled with the pair's distance or similarity."""
    ref, train = example["eval"], example["train"]
    measures = [f"{k} {v:.3g}" for k, v in example.items() if k not in ("eval", "train")]
    where = f"file:{ref['path']}" if "path" in ref else ref["shard"]
    eval_tile = Tile(ref["key"], "", "eval", [f"eval {ref['key']}"], source=where)
    train_tile = Tile(train["key"], "", "train", [f"train {train['key']}", *measures], source=train["shard"])
    return [eval_tile, train_tile]
