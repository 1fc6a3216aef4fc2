"""``data-tools stats``: counts and distributions of a set of shards, from their parquets.

Streams one shard's parquet at a time into fixed-bin histograms, so any number of shards fits in a few MB;
percentiles are exact to the bin width (1 pixel, 1 word, 0.001 of clip score). Shards and the embeddings
folder may be local or at fsspec URLs (``s3://…``); the report (``--output``) is written locally.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from webshards import outputs
from webshards.atomic import write_json_atomic
from webshards.layout import FAILURE_STATUSES, SUCCESS, iter_shard
from webshards.outputs import Location
from webshards.progress import Progress
from webshards.spec import expand_urls
from webshards.urls import open_url, redact_url

SIZE_FIELDS = ("width", "height", "original_width", "original_height")
PERCENTILES = (5, 50, 95)

log = logging.getLogger("data_tools")


@dataclass
class Histogram:
    """Counts of values in fixed bins ``low + i·step`` (values outside are clipped to the end bins)."""

    low: float
    step: float
    bins: int
    counts: np.ndarray = field(init=False)
    total: float = 0.0
    minimum: float = float("inf")
    maximum: float = float("-inf")

    def __post_init__(self) -> None:
        self.counts = np.zeros(self.bins, dtype=np.int64)

    def add(self, values: Any) -> None:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        index = np.clip(np.round((values - self.low) / self.step), 0, self.bins - 1).astype(np.int64)
        self.counts += np.bincount(index, minlength=self.bins)
        self.total += float(values.sum())
        self.minimum = min(self.minimum, float(values.min()))
        self.maximum = max(self.maximum, float(values.max()))

    def summary(self) -> dict[str, float]:
        """count, mean, min, p5, p50, p95, max (empty when no values)."""
        count = int(self.counts.sum())
        if count == 0:
            return {"count": 0}
        cumulative = np.cumsum(self.counts)
        out = {"count": count, "mean": round(self.total / count, 4), "min": self.minimum}
        for p in PERCENTILES:
            index = int(np.searchsorted(cumulative, p / 100 * count))
            out[f"p{p}"] = round(self.low + index * self.step, 4)
        return {**out, "max": self.maximum}


@dataclass
class ShardStats:
    """What ``data-tools stats`` gathers."""

    shards: int = 0
    statuses: Counter = field(default_factory=Counter)
    histograms: dict[str, Histogram] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SIZE_FIELDS:
            self.histograms[name] = Histogram(0, 1, 16385)
        self.histograms["caption_words"] = Histogram(0, 1, 1025)

    def to_dict(self) -> dict[str, Any]:
        statuses = {SUCCESS: 0, **dict.fromkeys(FAILURE_STATUSES, 0), **self.statuses}
        distributions = {name: h.summary() for name, h in self.histograms.items()}
        counts = {"shards": self.shards, "samples": statuses[SUCCESS], "rows": sum(statuses.values())}
        return {**counts, "statuses": statuses, "distributions": distributions}


def gather(spec: str, embeddings: Location | None = None) -> ShardStats:
    """Statistics of the shards of ``spec`` (and clip scores from an embeddings folder), local or URLs."""
    stats, urls = ShardStats(), expand_urls(spec)
    with Progress("stats", len(urls), "shards", "rows", logger=log) as progress, progress.ticking():
        for url in urls:
            tar = url if outputs.is_remote(url) else Path(url)
            if not outputs.exists(tar):
                raise ValueError(redact_url(f"shard not found: {tar}"))
            progress.update(1, _add_shard(stats, tar))
    if embeddings is not None:
        stats.histograms["clip_score"] = _clip_scores(embeddings)
    return stats


def _add_shard(stats: ShardStats, tar: Location) -> int:
    """Count a shard's rows by status and add its successful samples to the histograms; returns its rows."""
    stats.shards += 1
    parquet = outputs.beside(tar, ".parquet")
    if outputs.exists(parquet):
        table = outputs.read_parquet(parquet, columns=["status", "caption", *SIZE_FIELDS]).to_pydict()
    else:  # no parquet (e.g. written by another tool): the tar's json holds the successes
        with open_url(str(tar)) as stream:
            records = [sample.get("json", {}) for sample in iter_shard(stream)]
        names = ["caption", *SIZE_FIELDS]
        table = {"status": [SUCCESS] * len(records), **{n: [r.get(n) for r in records] for n in names}}
    stats.statuses.update(table["status"])
    ok = [i for i, status in enumerate(table["status"]) if status == SUCCESS]
    for name in SIZE_FIELDS:
        stats.histograms[name].add([table[name][i] for i in ok if table[name][i] is not None])
    stats.histograms["caption_words"].add([len((table["caption"][i] or "").split()) for i in ok])
    return len(table["status"])


def _clip_scores(folder: Location) -> Histogram:
    """The clip_score histogram of an embeddings folder's ``metadata/*.parquet`` (a path or URL)."""
    files = outputs.list_files(outputs.join(folder, "metadata"), "*.parquet")
    if not files:
        raise ValueError(redact_url(f"no metadata/*.parquet in embeddings folder {folder}"))
    histogram = Histogram(-1.0, 0.001, 2001)
    for file in files:
        scores = outputs.read_parquet(file, columns=["clip_score"]).column(0)
        histogram.add(scores.to_numpy(zero_copy_only=False))
    return histogram


def format_table(stats: ShardStats) -> str:
    """A short plain-text report: counts, then one line per distribution."""
    info = stats.to_dict()
    lines = [f"shards {info['shards']}   rows {info['rows']}   samples {info['samples']}"]
    lines += [f"  {status:<20} {n}" for status, n in info["statuses"].items()]
    lines.append(
        f"{'':<16}" + "".join(f"{c:>10}" for c in ("count", "mean", "min", "p5", "p50", "p95", "max"))
    )
    for name, summary in info["distributions"].items():
        cells = [summary.get(c, "-") for c in ("count", "mean", "min", "p5", "p50", "p95", "max")]
        lines.append(f"{name:<16}" + "".join(f"{_cell(c):>10}" for c in cells))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.3f}"
    return str(int(value)) if isinstance(value, float) else str(value)


def write_report(stats: ShardStats, output: str | Path) -> list[Path]:
    """Write ``stats.json`` and one PNG histogram per non-empty distribution; returns the files."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output / "stats.json", stats.to_dict())
    written = [output / "stats.json"]
    for name, histogram in stats.histograms.items():
        if histogram.counts.sum():
            written.append(_plot(name, histogram, output / f"{name}.png"))
    return written


def _plot(name: str, histogram: Histogram, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    centres = histogram.low + histogram.step * np.arange(histogram.bins)
    used = histogram.counts > 0
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(centres[used], bins=50, weights=histogram.counts[used])
    ax.set_xlabel(name)
    ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
