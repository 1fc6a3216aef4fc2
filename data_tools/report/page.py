"""The report's HTML: sections of tables, charts and rows of thumbnails, in one self-contained page.

No script and no outside resource: CSS is inline, thumbnails are ``data:`` URIs, charts inline SVG. Every
tile carries ``data-key`` and ``data-state`` (and ``data-rules`` for a removed sample), and the ``<body>``
``data-images``, the number of thumbnails drawn, so a test can check the page against the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

from data_tools.report.inputs import Stage
from data_tools.report.tiles import Tile

STYLE = """
body{font:13px/1.35 system-ui,sans-serif;margin:16px 24px;color:#222;background:#fafafa}
h1{font-size:20px}h2{font-size:16px;border-bottom:1px solid #ccc;margin-top:28px}h3{font-size:13px;margin:14px 0 4px}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:6px}
.tile{margin:0;width:136px;padding:3px;border:3px solid #bbb;background:#fff;font-size:11px}
.tile img{display:block;margin:auto;max-width:128px;max-height:128px}
.tile.kept{border-color:#3a8f4a}.tile.removed{border-color:#c0392b}
.tile.eval{border-color:#8e44ad}.tile.train{border-color:#d68910}
.tile .why{font-weight:600}.tile .info{color:#555}.tile.removed .why{color:#c0392b}
.tile.missing{color:#999}.note{color:#666}.warn{color:#c0392b;font-weight:600}
.pair{display:flex;gap:6px;margin-right:18px}nav a{margin-right:10px}
"""


@dataclass
class TileRow:
    """A titled row of thumbnails."""

    title: str
    tiles: list[Tile]
    note: str = ""
    pairs: bool = False
    """Lay the tiles out two by two (decontamination: eval sample beside training sample)."""


@dataclass
class Section:
    """A ``<h2>`` section: HTML fragments and rows of tiles, in order."""

    id: str
    title: str
    blocks: list[str | TileRow] = field(default_factory=list)

    def tiles(self) -> list[Tile]:
        return [t for b in self.blocks if isinstance(b, TileRow) for t in b.tiles]


def tile_html(tile: Tile) -> str:
    """One ``<figure>``: the thumbnail (or a note that it was not found), the caption, the labels."""
    attrs = f'data-key="{escape(tile.key)}" data-state="{tile.state}"'
    if tile.rules:
        attrs += f' data-rules="{escape(" ".join(tile.rules))}"'
    if tile.image is None:
        picture = '<div class="note">image not found</div>'
        classes = f"tile {tile.state} missing"
    else:
        width, height = tile.size
        picture = f'<img src="{tile.image}" width="{width}" height="{height}" alt="{escape(tile.key)}">'
        classes = f"tile {tile.state}"
    labels = "".join(
        f'<div class="{"why" if label.startswith("removed") else "info"}">{escape(label)}</div>'
        for label in tile.labels
    )
    return (
        f'<figure class="{classes}" {attrs}>{picture}<figcaption>{escape(tile.caption[:120])}'
        f"{labels}</figcaption></figure>"
    )


def row_html(row: TileRow) -> str:
    note = f' <span class="note">{escape(row.note)}</span>' if row.note else ""
    if row.pairs:
        groups = [row.tiles[i : i + 2] for i in range(0, len(row.tiles), 2)]
        body = "".join('<div class="pair">' + "".join(map(tile_html, g)) + "</div>" for g in groups)
    else:
        body = "".join(map(tile_html, row.tiles))
    return f'<h3>{escape(row.title)}{note}</h3><div class="row">{body}</div>'


def stages_table(stages: list[Stage]) -> str:
    """The counts per stage: samples in, kept, the share kept, notes."""

    def number(n: int | None) -> str:
        return "" if n is None else f"{n:,}"

    rows = []
    for stage in stages:
        share = f"{stage.kept / stage.samples:.1%}" if stage.samples and stage.kept is not None else ""
        cells = [escape(stage.name), escape(stage.where)]
        cells += [f'<td class="n">{v}</td>' for v in (number(stage.samples), number(stage.kept), share)]
        rows.append(
            f"<tr><td>{cells[0]}</td><td>{cells[1]}</td>{''.join(cells[2:])}<td>{escape(stage.notes)}</td></tr>"
        )
    head = (
        "<tr><th>stage</th><th>output</th><th>samples in</th><th>kept</th><th>share</th><th>notes</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def render(title: str, sections: list[Section], footer: str) -> tuple[str, int]:
    """The whole page and the number of thumbnails in it."""
    images = sum(t.image is not None for s in sections for t in s.tiles())
    nav = "".join(f'<a href="#{s.id}">{escape(s.title)}</a>' for s in sections)
    body = []
    for section in sections:
        blocks = "".join(b if isinstance(b, str) else row_html(b) for b in section.blocks)
        body.append(f'<section id="{section.id}"><h2>{escape(section.title)}</h2>{blocks}</section>')
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<link rel="icon" href="data:,"><style>{STYLE}</style></head><body data-images="{images}">'
        f"<h1>{escape(title)}</h1><nav>{nav}</nav>{''.join(body)}"
        f'<p class="note">{escape(footer)}</p></body></html>\n'
    )
    return page, images
