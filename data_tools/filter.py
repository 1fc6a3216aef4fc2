"""Keep lists from CLIP scores and basic image/caption rules, over an embeddings folder (see embed.py) or,
for rules that need no scores, straight over the shards (filter_shards.py).

The CLIP-score threshold is global: either given (``min_score``) or the score that keeps the top
``keep_fraction`` of all samples. The quantile is exact without holding every score at once: pass one
counts scores into 65,536 fixed bins over [-1, 1]; pass two reads back only the scores inside the bin that
holds the quantile and sorts those. Both passes read just the ``clip_score`` column of each metadata
parquet, so memory is the histogram plus one bin's scores, whatever the number of samples.

The embeddings folder and the keep list may be fsspec URLs (``s3://…``); the summary json, histogram png and
datacomp ``.npy`` go beside the keep list, on the same storage. The caption rules (language ID, vocabulary)
live in text_filters.py; ``rule_masks`` is the one place that applies every rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_tools import text_filters
from data_tools.embeddings import metadata_files, shard_index
from data_tools.filter_shards import shard_table
from webshards import outputs
from webshards.layout import iter_shard
from webshards.outputs import Location
from webshards.urls import open_url

QUANTILE_BINS = 65536
PLOT_BINS = 100
FORMATS = ("parquet", "datacomp")
KEEP_SCHEMA = pa.schema([("uid", pa.string())])
PRESETS: dict[str, dict[str, Any]] = {
    # DataComp's basic filter (baselines/apply_filter.py, load_uids_with_basic_filter_helper): fastText says
    # "en", caption > 2 words (str.split) and > 5 characters, min(original w, h) >= 200, max/min <= 3.0.
    "datacomp-basic": {
        "languages": ("en",),
        "min_words": 3,
        "min_chars": 6,
        "min_side": 200,
        "max_aspect_ratio": 3.0,
    },
}
"""Named rule sets (``--preset``); flags given beside a preset override its values."""


@dataclass(frozen=True)
class FilterConfig:
    """What a sample must satisfy to be kept; ``None`` switches a rule off."""

    min_score: float | None = None
    """Keep samples whose clip_score is at least this."""
    keep_fraction: float | None = None
    """Keep the top fraction of all samples by clip_score (ties at the threshold are all kept)."""
    min_side: int | None = None
    """Least image side in pixels (the source size: original_width/height, else width/height)."""
    max_aspect_ratio: float | None = None
    """Largest long side / short side."""
    min_words: int | None = None
    """Least number of whitespace-separated words in the caption."""
    min_chars: int | None = None
    """Least number of characters in the caption."""
    languages: tuple[str, ...] | None = None
    """Keep captions whose most likely language (py3langid) is one of these ISO 639 codes (mostly 639-1)."""
    language_min_confidence: float | None = None
    """With ``languages``: least probability of that language (py3langid's normalised one)."""
    vocabulary: str | None = None
    """Keep captions holding a term (whole words, any case) of this file, one term per line, or of
    ``imagenet`` (open_clip's ImageNet-1k class names)."""
    targets: tuple[str, ...] | None = None
    """Eval sets or image folders: keep samples in the k-means clusters nearest to their images
    (DataComp's image-based filter, image_filter.py)."""
    clusters: int | None = None
    """k-means clusters of the image-based rule; None: pool size / 128 (DataComp's ratio)."""

    def __post_init__(self) -> None:
        if self.languages is not None:  # a list from json (``FilterConfig(**summary["config"])``) or flags
            object.__setattr__(self, "languages", tuple(code.strip().lower() for code in self.languages))
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(self.targets))
        self._check_ranges()

    def _check_ranges(self) -> None:
        if self.min_score is not None and self.keep_fraction is not None:
            raise ValueError("give min_score or keep_fraction, not both")
        if self.keep_fraction is not None and not 0.0 <= self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in [0, 1], got {self.keep_fraction}")
        if self.min_side is not None and self.min_side < 1:
            raise ValueError(f"min_side must be at least 1, got {self.min_side}")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1.0:
            raise ValueError(f"max_aspect_ratio must be at least 1, got {self.max_aspect_ratio}")
        if self.min_words is not None and self.min_words < 0:
            raise ValueError(f"min_words must be at least 0, got {self.min_words}")
        if self.min_chars is not None and self.min_chars < 0:
            raise ValueError(f"min_chars must be at least 0, got {self.min_chars}")
        if self.languages is not None and (not self.languages or "" in self.languages):
            raise ValueError(f"languages must be non-empty codes, got {self.languages}")
        confidence = self.language_min_confidence
        if confidence is not None and (self.languages is None or not 0.0 <= confidence <= 1.0):
            raise ValueError(f"language_min_confidence must be in [0, 1] with languages, got {confidence}")
        if self.clusters is not None and (self.clusters < 1 or not self.targets):
            raise ValueError(f"clusters must be at least 1 and come with targets, got {self.clusters}")

    @property
    def has_rule(self) -> bool:
        """Whether any rule is on (a filter without one would keep everything)."""
        return any(value is not None for value in asdict(self).values())

    @property
    def has_score_rule(self) -> bool:
        return self.min_score is not None or self.keep_fraction is not None

    @property
    def needs_sizes(self) -> bool:
        return self.min_side is not None or self.max_aspect_ratio is not None


def preset_config(preset: str | None, **flags: Any) -> FilterConfig:
    """The rules of ``preset`` (None: none) with every flag that is not None put over them."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    given = {name: value for name, value in flags.items() if value is not None}
    return FilterConfig(**{**PRESETS.get(preset, {}), **given})


def check_rules(cfg: FilterConfig, scored: bool) -> None:
    """Before any task runs, one ValueError for a job that cannot work: no rule, a score rule without
    scores, an unknown language code, a vocabulary that is missing or empty."""
    if not cfg.has_rule:
        raise ValueError(
            "filter: no rule given (pass --min-score, --keep-fraction, --min-side, --max-aspect-ratio, "
            "--min-words, --min-chars, --language, --vocabulary, --target or --preset)"
        )
    if cfg.has_score_rule and not scored:
        raise ValueError("--min-score and --keep-fraction need clip scores: pass --embeddings")
    if cfg.targets is not None and not scored:
        raise ValueError("--target needs the image embeddings: pass --embeddings")
    if cfg.languages is not None:
        text_filters.check_languages(cfg.languages)
    if cfg.vocabulary is not None:
        text_filters.read_vocabulary(cfg.vocabulary)


def read_scores(path: Location) -> np.ndarray:
    """The clip_score column of one metadata parquet (float32)."""
    return outputs.read_parquet(path, ["clip_score"])["clip_score"].to_numpy(zero_copy_only=False)


def quantile_bin(scores: np.ndarray) -> np.ndarray:
    """The fixed bin of each score; the same function in both passes, so the counts agree exactly."""
    scaled = np.floor((np.clip(scores, -1.0, 1.0) + 1.0) * (QUANTILE_BINS / 2.0))
    return np.minimum(scaled.astype(np.int64), QUANTILE_BINS - 1)


def quantile_plan(counts: np.ndarray, keep_fraction: float) -> tuple[int, int] | None:
    """From the bin counts: the bin holding the threshold and the rank of the threshold inside it
    (0 = the bin's best); None when nothing is kept."""
    keep = round(keep_fraction * int(counts.sum()))
    if keep == 0:
        return None
    above = np.cumsum(counts[::-1])[::-1]  # above[b]: samples in bin b or higher
    target = int(np.flatnonzero(above >= keep)[-1])
    higher = int(above[target] - counts[target])
    return target, keep - higher - 1


def pick_threshold(in_bin: list[np.ndarray], plan: tuple[int, int]) -> float:
    """The threshold: the score of the planned rank among all scores of the target bin."""
    ranked = np.sort(np.concatenate(in_bin))[::-1]
    return float(ranked[plan[1]])


def _sizes(table: pa.Table) -> tuple[np.ndarray, np.ndarray] | None:
    """Source width and height per row (original size where known); None when the table has none."""
    names = table.column_names
    pairs = [("original_width", "original_height"), ("width", "height")]
    columns = [(table[w], table[h]) for w, h in pairs if w in names and h in names]
    if not columns:
        return None
    width = np.full(table.num_rows, np.nan)
    height = np.full(table.num_rows, np.nan)
    for w, h in columns:
        fill = np.isnan(width)
        width[fill] = w.to_numpy(zero_copy_only=False).astype(float)[fill]
        height[fill] = h.to_numpy(zero_copy_only=False).astype(float)[fill]
    return width, height


def _sizes_from_shard(url: str, keys: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Width and height of ``keys`` read from the KEY.json members of the shard they came from."""
    found: dict[str, tuple[float, float]] = {}
    with open_url(url) as stream:
        for sample in iter_shard(stream):
            meta = sample.get("json") or {}
            width = meta.get("original_width") or meta.get("width")
            height = meta.get("original_height") or meta.get("height")
            found[sample["__key__"]] = (width or math.nan, height or math.nan)
    pairs = np.array([found.get(k, (math.nan, math.nan)) for k in keys], dtype=float).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def rule_masks(
    table: pa.Table,
    cfg: FilterConfig,
    threshold: float,
    sizes: tuple[np.ndarray, np.ndarray] | None,
    image_based: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One boolean 'passes' mask per active rule (score, min_side, max_aspect_ratio, min_words, min_chars,
    language, vocabulary, image_based).

    ``sizes`` (width, height per row) is needed, and must be complete, when a size rule is on. Languages are
    read from the table's ``language`` columns when it has them (``text_filters.with_languages``), else
    identified here. ``image_based`` (``image_filter.ImageRule.mask``) is given when ``cfg.targets`` is.
    """
    masks = {}
    if threshold > -math.inf:
        masks["score"] = table["clip_score"].to_numpy(zero_copy_only=False) >= threshold
    if cfg.needs_sizes:
        width, height = sizes
        if cfg.min_side is not None:
            masks["min_side"] = np.minimum(width, height) >= cfg.min_side
        if cfg.max_aspect_ratio is not None:
            ratio = np.maximum(width, height) / np.maximum(np.minimum(width, height), 1)
            masks["max_aspect_ratio"] = ratio <= cfg.max_aspect_ratio
    if cfg.min_words is not None:
        words = [len((c or "").split()) for c in table["caption"].to_pylist()]
        masks["min_words"] = np.array(words, dtype=np.int64) >= cfg.min_words
    if cfg.min_chars is not None:
        chars = [len(c or "") for c in table["caption"].to_pylist()]
        masks["min_chars"] = np.array(chars, dtype=np.int64) >= cfg.min_chars
    if cfg.languages is not None:
        masks["language"] = _language_mask(text_filters.with_languages(table), cfg)
    if cfg.vocabulary is not None:
        masks["vocabulary"] = text_filters.vocabulary_mask(table["caption"].to_pylist(), cfg.vocabulary)
    if image_based is not None:
        masks["image_based"] = image_based
    return masks


def _language_mask(table: pa.Table, cfg: FilterConfig) -> np.ndarray:
    """Whether each caption's language is one of ``cfg.languages``, as likely as asked."""
    languages = np.array(table["language"].to_pylist(), dtype=object)
    passes = np.isin(languages, list(cfg.languages))
    if cfg.language_min_confidence is not None:
        confidence = table["language_confidence"].to_numpy(zero_copy_only=False)
        passes &= confidence >= cfg.language_min_confidence
    return passes


def datacomp_uids(uids: list[str] | np.ndarray) -> np.ndarray:
    """DataComp's keep-list array: sorted ``np.dtype("u8,u8")`` pairs, high 64 bits of the 32-hex uid first."""
    raw = bytes.fromhex("".join(uids))
    halves = np.frombuffer(raw, dtype=">u8").reshape(-1, 2).astype(np.uint64)
    pairs = np.empty(len(halves), dtype=np.dtype("u8,u8"))
    pairs["f0"], pairs["f1"] = halves[:, 0], halves[:, 1]
    pairs.sort()
    return pairs


def _shard_url(metadata: Location, urls: list[str] | None) -> str:
    """The shard that ``metadata_{i}.parquet`` came from: the i-th of ``--shards``."""
    if urls is None:
        raise ValueError(f"size rules need width/height: {outputs.name(metadata)} has none, pass --shards")
    index = shard_index(metadata)
    if index >= len(urls):
        raise ValueError(f"{outputs.name(metadata)} has no shard in --shards ({len(urls)} shards)")
    return urls[index]


def filtered_tables(
    files: list[Location],
    cfg: FilterConfig,
    threshold: float,
    urls: list[str] | None,
    from_shards: bool = False,
    image_rule: Any = None,
) -> Iterator[tuple[pa.Table, dict[str, np.ndarray]]]:
    """Each input table (a metadata parquet, or with ``from_shards`` the rows of a shard) with its rule masks;
    sizes looked up in the shards only when needed, languages identified once and kept as columns, the
    image-based mask from ``image_rule`` (an ``image_filter.ImageRule``) when given."""
    for path in files:
        table = shard_table(path) if from_shards else outputs.read_parquet(path)
        if cfg.languages is not None:
            table = text_filters.with_languages(table)
        sizes = _table_sizes(table, path, cfg, urls, from_shards) if cfg.needs_sizes else None
        image_based = image_rule.mask(path) if image_rule is not None else None
        yield table, rule_masks(table, cfg, threshold, sizes, image_based)


def _table_sizes(
    table: pa.Table, path: Location, cfg: FilterConfig, urls: list[str] | None, from_shards: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Width and height of every row: the table's own, else (metadata tables) the shard's KEY.json."""
    sizes = _sizes(table)
    if sizes is not None and not np.isnan(sizes[0]).any():
        return sizes
    if from_shards:
        raise ValueError(f"size rules: some samples of {path} have no width/height in their json")
    sizes = _sizes_from_shard(_shard_url(path, urls), table["key"].to_pylist())
    if np.isnan(sizes[0]).any():
        raise ValueError(f"size rules: some samples of {outputs.name(path)} are not in its shard")
    return sizes


def input_files(embeddings: Location, fmt: str) -> list[Location]:
    """The metadata parquets to filter, in shard order; a ValueError for a bad format or none found."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    files = metadata_files(embeddings)
    if not files:
        raise ValueError(f"no metadata/metadata_*.parquet in {embeddings}")
    return files


def kept_uids(table: pa.Table, keep: np.ndarray) -> pa.Table:
    """The keep-list rows of one metadata table."""
    return pa.table({"uid": table["uid"].filter(pa.array(keep))}, schema=KEEP_SCHEMA)


def keep_list_location(output: Location) -> Location:
    """The keep list as a ``Path`` (local) or a URL without a trailing slash."""
    return str(output).rstrip("/") if outputs.is_remote(output) else Path(output)


def write_outputs(
    output: Location, fmt: str, tally: Tally, cfg: FilterConfig, threshold: float, scored: bool = True
) -> dict[str, Any]:
    """After the keep list ``output``: the datacomp ``.npy`` (if asked), the summary json and (with ``scored``
    inputs) the PNG of scores, all beside it (the same storage, local or remote)."""
    if fmt == "datacomp":
        kept = outputs.read_parquet(output, ["uid"])["uid"].to_pylist()
        outputs.save_npy(outputs.beside(output, ".npy"), datacomp_uids(kept))
    summary = tally.summary(cfg, threshold, output, fmt)
    outputs.write_json(summary_path(output), summary)
    if scored:
        plot_histogram(tally, threshold, histogram_path(output))
    return summary


def summary_path(output: Location) -> Location:
    return outputs.beside(output, "_summary.json")


def histogram_path(output: Location) -> Location:
    return outputs.beside(output, "_scores.png")


def languages_path(output: Location) -> Location:
    """Per sample its language and confidence (``--language``): uid, language, language_confidence."""
    return outputs.beside(output, "_languages.parquet")


class Tally:
    """Counts, score histograms and languages gathered while streaming the tables."""

    def __init__(self) -> None:
        self.samples = self.kept = 0
        self.removed: dict[str, int] = {}
        self.languages: dict[str, int] = {}
        self.edges = np.linspace(-1.0, 1.0, PLOT_BINS + 1)
        self.all_hist = np.zeros(PLOT_BINS, dtype=np.int64)
        self.kept_hist = np.zeros(PLOT_BINS, dtype=np.int64)

    def add(self, table: pa.Table, masks: dict[str, np.ndarray]) -> np.ndarray:
        """Record one table; returns its keep mask (all rules pass)."""
        keep = np.ones(table.num_rows, dtype=bool)
        for rule, passes in masks.items():
            self.removed[rule] = self.removed.get(rule, 0) + int((~passes).sum())
            keep &= passes
        if "clip_score" in table.column_names:  # (rows read straight from shards have no scores)
            scores = np.clip(table["clip_score"].to_numpy(zero_copy_only=False), -1.0, 1.0)
            self.all_hist += np.histogram(scores, self.edges)[0]
            self.kept_hist += np.histogram(scores[keep], self.edges)[0]
        if "language" in table.column_names:
            for language in table["language"].to_pylist():
                self.languages[language] = self.languages.get(language, 0) + 1
        self.samples += table.num_rows
        self.kept += int(keep.sum())
        return keep

    def as_dict(self) -> dict[str, Any]:
        """The counts as JSON-friendly values (one shard's tally, merged later with ``merge``)."""
        hists = {"all_hist": self.all_hist.tolist(), "kept_hist": self.kept_hist.tolist()}
        counts = {"samples": self.samples, "kept": self.kept, "removed": self.removed}
        return {**counts, "languages": self.languages, **hists}

    def merge(self, other: dict[str, Any]) -> None:
        """Add a tally written by ``as_dict`` (rules in their first-seen order, as one pass counts them)."""
        self.samples += other["samples"]
        self.kept += other["kept"]
        for rule, count in other["removed"].items():
            self.removed[rule] = self.removed.get(rule, 0) + count
        for language, count in other["languages"].items():
            self.languages[language] = self.languages.get(language, 0) + count
        self.all_hist += np.asarray(other["all_hist"], dtype=np.int64)
        self.kept_hist += np.asarray(other["kept_hist"], dtype=np.int64)

    def summary(self, cfg: FilterConfig, threshold: float, output: Location, fmt: str) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "kept": self.kept,
            "kept_fraction": self.kept / self.samples if self.samples else 0.0,
            "score_threshold": threshold if math.isfinite(threshold) else None,
            "failed_rule": self.removed,
            "languages": dict(sorted(self.languages.items(), key=lambda item: (-item[1], item[0]))),
            "config": asdict(cfg),
            "keep_list": str(output),
            "format": fmt,
        }


def plot_histogram(tally: Tally, threshold: float, path: Location) -> None:
    """A PNG of the clip_score distribution, all samples against kept ones, with the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    centres = (tally.edges[:-1] + tally.edges[1:]) / 2
    width = tally.edges[1] - tally.edges[0]
    ax.bar(centres, tally.all_hist, width=width, color="0.75", label="all")
    ax.bar(centres, tally.kept_hist, width=width, color="tab:blue", label="kept")
    if math.isfinite(threshold):
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.3f}")
    used = np.flatnonzero(tally.all_hist)
    if len(used):
        ax.set_xlim(tally.edges[used[0]] - width, tally.edges[used[-1] + 1] + width)
    ax.set(xlabel="clip_score (cosine)", ylabel="samples", title=f"{tally.kept} of {tally.samples} kept")
    ax.legend()
    fig.tight_layout()
    with outputs.staged(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
