"""Small inline SVG charts for the report: horizontal bars and a sorted log-scale curve.

Plain SVG text rather than matplotlib images: a few kilobytes, sharp at any zoom, no fonts to embed, and the
page stays one file that needs no script.
"""

from __future__ import annotations

import math
from html import escape

BAR_HEIGHT = 16
LABEL_WIDTH = 170
CHART_WIDTH = 640
COLOURS = {"all": "#b8b8b8", "matched": "#b8b8b8", "kept": "#2f6fb3"}


def bar_chart(rows: list[tuple[str, int, int | None]], title: str) -> str:
    """One bar per (label, count, kept-or-None) row, longest first as given; a kept count is drawn over its
    bar in the kept colour."""
    if not rows:
        return ""
    top = max(count for _, count, _ in rows) or 1
    span = CHART_WIDTH - LABEL_WIDTH - 90
    height = BAR_HEIGHT * len(rows) + 30
    parts = [_open(CHART_WIDTH, height, title), f'<text x="4" y="14" class="t">{escape(title)}</text>']
    for i, (label, count, kept) in enumerate(rows):
        y = 24 + i * BAR_HEIGHT
        parts.append(
            f'<text x="{LABEL_WIDTH - 6}" y="{y + 11}" text-anchor="end">{escape(label[:28])}</text>'
        )
        parts.append(_rect(LABEL_WIDTH, y, span * count / top, COLOURS["all"]))
        if kept is not None:
            parts.append(_rect(LABEL_WIDTH, y, span * kept / top, COLOURS["kept"]))
        shown = f"{count:,}" if kept is None else f"{kept:,} / {count:,}"
        parts.append(f'<text x="{LABEL_WIDTH + span * count / top + 4:.1f}" y="{y + 11}">{shown}</text>')
    return "".join(parts) + "</svg>"


def log_curve(series: dict[str, list[int]], title: str, line: float | None = None) -> str:
    """Each series sorted from largest to smallest against its rank, the counts on a log scale, with an
    optional horizontal line (e.g. MetaCLIP's t)."""
    values = [v for counts in series.values() for v in counts if v > 0]
    if not values:
        return ""
    width, height, left, bottom = CHART_WIDTH, 240, 50, 24
    low, high = math.log10(min(values)), math.log10(max(max(values), line or 0, 1))
    high = max(high, low + 1)

    def y_of(v: float) -> float:
        return 16 + (height - bottom - 16) * (high - math.log10(max(v, 10**low))) / (high - low)

    parts = [_open(width, height, title), f'<text x="{left}" y="12" class="t">{escape(title)}</text>']
    for power in range(math.ceil(low), math.floor(high) + 1):
        parts.append(f'<text x="{left - 4}" y="{y_of(10**power) + 4:.1f}" text-anchor="end">1e{power}</text>')
    longest = max(len(c) for c in series.values())
    for name, counts in series.items():
        ranked = sorted((c for c in counts if c > 0), reverse=True)
        step = (width - left - 10) / max(longest - 1, 1)
        points = " ".join(f"{left + i * step:.1f},{y_of(c):.1f}" for i, c in enumerate(ranked))
        colour = COLOURS.get(name, "#555")
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
    if line:
        y = y_of(line)
        parts.append(
            f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c33" stroke-dasharray="4"/>'
        )
    legend = "".join(f' <tspan fill="{COLOURS.get(n, "#555")}">&#9632; {escape(n)}</tspan>' for n in series)
    parts.append(f'<text x="{left}" y="{height - 6}">entries by rank:{legend}</text>')
    return "".join(parts) + "</svg>"


def _open(width: int, height: int, title: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(title)}" font-family="sans-serif" font-size="11">'
    )


def _rect(x: float, y: float, width: float, colour: str) -> str:
    return f'<rect x="{x}" y="{y}" width="{max(width, 0.5):.1f}" height="{BAR_HEIGHT - 3}" fill="{colour}"/>'
