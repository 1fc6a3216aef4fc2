"""Which samples a report shows for a filter and for each CLIP-score decile, drawn from an embeddings folder.

Filter decisions are not stored per sample; they are recomputed: the filter's config is rebuilt from its
summary json and the filter's own ``filtered_tables`` (so every rule it has, with its masks) is applied to
the metadata parquets, visited in a random order and only until every group (kept, and one per rule that
removed anything) holds its samples. The keep list is then read (streamed, only the ``uid`` column) to
check that the recomputed decisions of the shown samples agree with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_tools.embeddings import shard_index
from data_tools.filter import QUANTILE_BINS, FilterConfig, filtered_tables, quantile_bin, read_scores
from data_tools.image_filter import rule_of_keep_list
from data_tools.report.tiles import Tile
from webshards import outputs
from webshards.outputs import Location
from webshards.urls import open_url

DECILES = 10
SAMPLE_COLUMNS = ["key", "uid", "caption", "clip_score"]


@dataclass
class Decisions:
    """The samples shown for one filter: group name (``kept`` or a rule) -> tiles, and the checks."""

    groups: dict[str, list[Tile]] = field(default_factory=dict)
    disagree: int = 0
    """Shown samples whose recomputed decision differs from the keep list."""


def filter_config(summary: dict[str, Any], where: Location) -> tuple[FilterConfig, float]:
    """The filter's config and score threshold, rebuilt from its summary json."""
    try:
        cfg = FilterConfig(**summary["config"])
    except (KeyError, TypeError) as error:
        raise ValueError(f"{where}: no usable filter config ({error})") from None
    threshold = summary.get("score_threshold")
    if threshold is None:  # no score rule, or (keep_fraction) nothing kept
        no_rule = cfg.min_score is None and cfg.keep_fraction is None
        threshold = -math.inf if no_rule else math.inf
    return cfg, float(threshold)


def sample_decisions(
    files: list[Location],
    summary: dict[str, Any],
    where: Location,
    urls: list[str] | None,
    per_group: int,
    rng: np.random.Generator,
    from_shards: bool = False,
) -> Decisions:
    """Up to ``per_group`` kept samples and, per rule, samples that rule removes (labelled with every rule
    each one fails). ``files`` are metadata parquets, or with ``from_shards`` (a filter run without
    embeddings) the shards themselves."""
    cfg, threshold = filter_config(summary, where)
    expected = {"kept": summary.get("kept", 1), **summary.get("failed_rule", {})}
    decisions = Decisions({name: [] for name, count in expected.items() if count})
    order = [files[i] for i in rng.permutation(len(files))]
    image_rule = rule_of_keep_list(where, files[0]) if cfg.targets and files else None  # filter --target
    tables = filtered_tables(order, cfg, threshold, urls, from_shards=from_shards, image_rule=image_rule)
    for path, (table, masks) in zip(order, tables):
        source = str(path) if from_shards else _source(path, urls)
        keep = np.logical_and.reduce(list(masks.values())) if masks else np.ones(table.num_rows, bool)
        for name, chosen in [("kept", keep), *((rule, ~passes) for rule, passes in masks.items())]:
            if "failed_rule" not in summary:  # a summary without counts: show every rule
                decisions.groups.setdefault(name, [])
            if name not in decisions.groups:
                continue
            tiles = decisions.groups[name]
            for row in _pick(np.flatnonzero(chosen), per_group - len(tiles), rng):
                failed = [rule for rule, passes in masks.items() if not passes[row]]
                tiles.append(_decision_tile(table, int(row), failed, cfg, threshold, source))
        if all(len(tiles) >= per_group for tiles in decisions.groups.values()):
            break
    return decisions


def _source(path: Location, urls: list[str] | None) -> str | None:
    """The shard of metadata_{i}.parquet (the i-th of ``--shards``), where its images are."""
    index = shard_index(path)
    return urls[index] if urls and index < len(urls) else None


def _pick(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``rows`` at random (all of them when fewer), in row order."""
    if n <= 0 or not len(rows):
        return rows[:0]
    return np.sort(rng.choice(rows, min(n, len(rows)), replace=False))


def _decision_tile(
    table: pa.Table, row: int, failed: list[str], cfg: FilterConfig, threshold: float, source: str | None
) -> Tile:
    values = {name: table[name][row].as_py() for name in table.column_names}
    tile = Tile(values["key"], values.get("caption") or "", "removed" if failed else "kept", source=source)
    tile.labels = [f"score {values['clip_score']:.3f}"] if values.get("clip_score") is not None else []
    tile.labels += [f"removed by {rule}{_why(rule, values, cfg, threshold)}" for rule in failed]
    tile.rules, tile.uid = failed, values.get("uid")
    return tile


def _why(rule: str, values: dict[str, Any], cfg: FilterConfig, threshold: float) -> str:
    """The value that failed a rule the report knows (the filter may have more; they show by name only)."""
    width = values.get("original_width") or values.get("width")
    height = values.get("original_height") or values.get("height")
    if rule == "score":
        return f": {values['clip_score']:.4f} < {threshold:.4f}"
    if rule == "min_words":
        return f": {len((values.get('caption') or '').split())} < {cfg.min_words} words"
    if width and height and rule == "min_side":
        return f": {min(width, height)} px < {cfg.min_side}"
    if width and height and rule == "max_aspect_ratio":
        return f": {max(width, height) / min(width, height):.2f} > {cfg.max_aspect_ratio}"
    return _why_caption(rule, values, cfg)


def _why_caption(rule: str, values: dict[str, Any], cfg: FilterConfig) -> str:
    """The value that failed a caption rule (length, language, vocabulary)."""
    if rule == "min_chars":
        return f": {len(values.get('caption') or '')} < {cfg.min_chars} characters"
    if rule == "language" and values.get("language") is not None:
        return f": {values['language']} ({values['language_confidence']:.2f})"
    if rule == "vocabulary":
        return f": no term of {cfg.vocabulary}"
    return ""


def check_keep_list(keep_list: Location, decisions: Decisions) -> None:
    """Count the shown samples whose recomputed decision differs from the keep list (streamed by batch)."""
    tiles = [t for group in decisions.groups.values() for t in group]
    shown = pa.array(sorted({t.uid for t in tiles if t.uid}), pa.string())
    listed: set[str] = set()
    with open_url(str(keep_list)) as f:
        for batch in pq.ParquetFile(f).iter_batches(columns=["uid"]):
            listed.update(shown.filter(pc.is_in(shown, batch.column(0))).to_pylist())
    decisions.disagree = sum((t.uid in listed) != (t.state == "kept") for t in tiles)


def score_deciles(files: list[Location]) -> np.ndarray | None:
    """The 11 edges of the clip_score deciles over every sample (min, 9 cut points, max), from fixed-bin
    counts as the filter's quantile (exact to a bin, 3e-5); None without scores."""
    counts = np.zeros(QUANTILE_BINS, dtype=np.int64)
    low, high = math.inf, -math.inf
    for path in files:
        scores = read_scores(path)
        if len(scores):
            counts += np.bincount(quantile_bin(scores), minlength=QUANTILE_BINS)
            low, high = min(low, float(scores.min())), max(high, float(scores.max()))
    if not counts.sum():
        return None
    ranks = np.ceil(np.arange(1, DECILES) / DECILES * counts.sum())
    cuts = np.searchsorted(np.cumsum(counts), ranks) * (2.0 / QUANTILE_BINS) - 1.0
    return np.concatenate([[low], np.clip(cuts, low, high), [high]])


def sample_deciles(
    files: list[Location], edges: np.ndarray, urls: list[str] | None, per_group: int, rng: np.random.Generator
) -> list[list[Tile]]:
    """Up to ``per_group`` random samples of each decile, from metadata parquets visited in random order."""
    rows: list[list[Tile]] = [[] for _ in range(DECILES)]
    for i in rng.permutation(len(files)):
        table = outputs.read_parquet(files[i], SAMPLE_COLUMNS)
        scores = table["clip_score"].to_numpy(zero_copy_only=False)
        decile = np.clip(np.searchsorted(edges[1:-1], scores, side="right"), 0, DECILES - 1)
        for d, tiles in enumerate(rows):
            for row in _pick(np.flatnonzero(decile == d), per_group - len(tiles), rng):
                key, caption = table["key"][row].as_py(), table["caption"][row].as_py() or ""
                label = f"score {scores[row]:.3f}"
                tiles.append(Tile(key, caption, "sample", [label], source=_source(files[i], urls)))
        if all(len(tiles) >= per_group for tiles in rows):
            break
    return rows
