"""data-tools report: the page of a tiny curation run made from demo data, checked against the data itself, then
loaded in a real headless Chromium (no console errors, every thumbnail decoded, a screenshot that is not blank)."""

from __future__ import annotations

import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from headless_browser import CHROMIUM, SKIP_REASON, Browser
from PIL import Image

from data_tools.cli import main
from webshards.layout import ShardWriter, iter_shard, key_for

MIN_SIDE, MAX_ASPECT = 32, 2.0
MIN_CHARS, MIN_CONFIDENCE = 30, 0.9
PER_GROUP = 6
SECTIONS = [
    "counts",
    "filter-0",
    "filter-1",
    "deciles",
    "dedup-0",
    "dedup-1",
    "decontaminate-0",
    "metaclip-0",
]


def resized(data: bytes, size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").resize(size).save(out, format="JPEG", quality=90)
    return out.getvalue()


def write_run_shards(demo_data: Path, out: Path) -> dict[str, dict]:
    """Two shards of 40 demo samples each: every 5th made wide (96x40), every 5th+1 small (24x24), and every
    7th followed by a byte-identical copy; returns KEY.json per key."""
    records = {}
    for shard in range(2):
        with ShardWriter(out, shard) as writer:
            index = 0
            for i, sample in enumerate(iter_shard(demo_data / "train" / f"{shard:05d}.tar")):
                if i == 40:
                    break
                image = {1: resized(sample["jpg"], (96, 40)), 2: resized(sample["jpg"], (24, 24))}.get(i % 5)
                image = image or sample["jpg"]
                for copy in range(2 if i % 7 == 3 else 1):
                    meta = {"path": f"{shard}/{i}/{copy}"}
                    record = writer.add(key_for(shard, index), image, sample["txt"], meta)
                    records[record["key"]] = record
                    index += 1
    return records


class Page(HTMLParser):
    """The report's structure: section ids, every tile (key, state, rules, has an image), row titles."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.sections, self.tiles, self.rows, self.images, self.body = [], [], [], 0, {}
        self.svgs, self._heading = [], None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        elif tag == "body":
            self.body = attrs
        elif tag == "figure":
            self.tiles.append(
                {**attrs, "section": self.sections[-1], "row": len(self.rows) - 1, "img": False}
            )
        elif tag == "img":
            self.images += 1
            self.tiles[-1]["img"] = True
        elif tag == "h3":
            self._heading = ""
        elif tag == "svg":
            self.svgs.append(attrs.get("aria-label", ""))

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "h3":
            self.rows.append((self.sections[-1], self._heading))
            self._heading = None


@pytest.fixture(scope="module")
def run(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A curation run (embed, filter with --min-score and size rules, exact and perceptual dedup) plus the
    files of stages being added (decontaminate pairs, languages, MetaCLIP entry counts, lineage), and its
    report."""
    root = tmp_path_factory.mktemp("report-run")
    records = write_run_shards(demo_data, root / "shards")
    spec = f"{root}/shards/{{00000..00001}}.tar"
    assert main(["embed", "--shards", spec, "--model", "tiny-clip", "--output", str(root / "emb")]) == 0
    metadata = pa.concat_tables(
        pq.read_table(p) for p in sorted((root / "emb" / "metadata").glob("*.parquet"))
    )
    min_score = float(np.median(metadata["clip_score"].to_numpy()))
    keep = root / "clip_keep.parquet"
    rules = [
        "--min-score",
        str(min_score),
        "--min-side",
        str(MIN_SIDE),
        "--max-aspect-ratio",
        str(MAX_ASPECT),
    ]
    assert main(["filter", "--embeddings", str(root / "emb"), *rules, "--output", str(keep)]) == 0
    for method in ("exact", "perceptual"):
        assert main(["dedup", "--shards", spec, "--method", method, "--output", str(root / method)]) == 0
    curated = ["reshard", "--shards", spec, "--keep", str(keep), "--output", str(root / "curated")]
    assert main(curated) == 0
    write_other_stages(root, demo_data, metadata, spec)
    args = ["report", "--shards", spec, "--embeddings", str(root / "emb"), "--filter", str(keep)]
    args += [
        "--dedup",
        str(root / "exact"),
        "--dedup",
        str(root / "perceptual"),
        "--decontaminate",
        str(root / "decontam"),
    ]
    args += ["--metaclip", str(root / "metaclip.parquet"), "--samples-per-group", str(PER_GROUP)]
    args += ["--reshard", str(root / "curated"), "--filter", str(root / "text_keep.parquet")]
    return {
        "root": root,
        "records": records,
        "metadata": metadata,
        "min_score": min_score,
        "keep": keep,
        "args": args,
    }


def write_other_stages(root: Path, demo_data: Path, metadata: pa.Table, spec: str) -> None:
    """The outputs of the stages not run above: decontaminate against an eval folder holding copies of two
    training images, a languages parquet beside the keep list, MetaCLIP entry counts, a lineage.json."""
    shard = root / "shards" / "00000.tar"
    (root / "eval-folder").mkdir()
    for sample, _ in zip(iter_shard(shard, decode=False), range(2)):
        ext = next(e for e in ("jpg", "png", "webp") if e in sample)
        (root / "eval-folder" / f"copy{sample['__key__']}.{ext}").write_bytes(sample[ext])
    args = ["decontaminate", "--shards", spec, "--eval-set", str(root / "eval-folder"), "--method", "exact"]
    assert main([*args, "--output", str(root / "decontam")]) == 0
    text = ["filter", "--shards", spec, "--language", "en", "--language-min-confidence", str(MIN_CONFIDENCE)]
    text += ["--min-chars", str(MIN_CHARS), "--output", str(root / "text_keep.parquet")]
    assert main(text) == 0  # on the shards alone: no score rule
    entries = root / "entries.txt"
    entries.write_text("\n".join(["a", "e", "o", "red", "blue", "circle", "square"]) + "\n")
    args = ["metaclip", "--shards", spec, "--entries", str(entries), "--t", "5"]
    assert main([*args, "--output", str(root / "metaclip.parquet")]) == 0
    (root / "exact" / "lineage.json").write_text(json.dumps({"steps": ["build", "dedup"]}))


@pytest.fixture(scope="module")
def page(run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("report-page")
    printed = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(printed):
        assert main([*run["args"], "--output", str(out)]) == 0
    html = (out / "index.html").read_text()
    return {"path": out / "index.html", "html": html, "parsed": Page(html), "printed": printed.getvalue()}


def test_sections_and_thumbnail_count(page: dict) -> None:
    parsed = page["parsed"]
    assert parsed.sections == SECTIONS
    assert parsed.images == int(parsed.body["data-images"]) > 0
    assert f"{parsed.images} thumbnails" in page["printed"]
    assert all(tile["img"] for tile in parsed.tiles)  # every sample shown was found in its shard
    assert len(page["html"].encode()) < 600_000  # bounded: PER_GROUP thumbnails per row


def test_removed_samples_are_labelled_with_the_rules_they_fail(run: dict, page: dict) -> None:
    """Each removed tile names exactly the rules its own values fail, checked here from KEY.json (sizes) and
    the metadata (score); each kept tile passes all and is in the keep list."""
    scores = dict(zip(run["metadata"]["key"].to_pylist(), run["metadata"]["clip_score"].to_numpy()))
    kept = set(pq.read_table(run["keep"])["uid"].to_pylist())
    tiles = [t for t in page["parsed"].tiles if t["section"] == "filter-0"]
    seen = set()
    for tile in tiles:
        record = run["records"][tile["data-key"]]
        width, height = record["original_width"], record["original_height"]
        fails = {
            "score": scores[tile["data-key"]] < np.float32(run["min_score"]),
            "min_side": min(width, height) < MIN_SIDE,
            "max_aspect_ratio": max(width, height) / min(width, height) > MAX_ASPECT,
        }
        expected = {rule for rule, failed in fails.items() if failed}
        assert set(tile.get("data-rules", "").split()) == expected, tile
        assert (tile["data-state"] == "kept") == (not expected) == (record["uid"] in kept)
        seen |= expected or {"kept"}
    assert seen == {"kept", "score", "min_side", "max_aspect_ratio"}  # every decision is shown
    rows = [title for section, title in page["parsed"].rows if section == "filter-0"]
    assert rows[0].startswith("kept") and {r.split()[2] for r in rows[1:]} == seen - {"kept"}


def test_caption_rules_of_a_filter_on_the_shards_alone(run: dict, page: dict) -> None:
    """A filter without embeddings (language, caption length): each removed tile names the rules that
    py3langid itself and the caption's length say it fails."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    tiles = [t for t in page["parsed"].tiles if t["section"] == "filter-1"]
    seen = set()
    for tile in tiles:
        caption = run["records"][tile["data-key"]]["caption"]
        language, confidence = identifier.classify(caption)
        fails = {
            "min_chars": len(caption) < MIN_CHARS,
            "language": language != "en" or confidence < MIN_CONFIDENCE,
        }
        expected = {rule for rule, failed in fails.items() if failed}
        assert set(tile.get("data-rules", "").split()) == expected, tile
        seen |= expected or {"kept"}
    assert {"min_chars", "language"} <= seen
    assert any(label.startswith("languages (top") for label in page["parsed"].svgs)


def test_deciles_agree_with_numpy(run: dict, page: dict) -> None:
    """Ten rows; every sample shown lies in its row's score range, and the ranges cut the scores in tenths."""
    scores = run["metadata"]["clip_score"].to_numpy().astype(np.float64)
    by_key = dict(zip(run["metadata"]["key"].to_pylist(), scores))
    rows = [(i, title) for i, (section, title) in enumerate(page["parsed"].rows) if section == "deciles"]
    assert len(rows) == 10
    ranges = [tuple(map(float, re.findall(r"-?\d+\.\d+", title))) for _, title in rows]
    for (row, _), (low, high) in zip(rows, ranges):
        shown = [by_key[t["data-key"]] for t in page["parsed"].tiles if t["row"] == row]
        assert 0 < len(shown) <= PER_GROUP
        assert all(low - 1e-3 <= s <= high + 1e-3 for s in shown)
    for k, (low, _) in enumerate(ranges[1:], start=1):
        assert abs((scores < low).mean() - k / 10) <= 1 / len(scores) + 0.02


def test_duplicates_decontamination_and_distributions(run: dict, page: dict) -> None:
    parsed = page["parsed"]
    for index, method in enumerate(("exact", "perceptual")):
        table = pq.read_table(run["root"] / method / "duplicates.parquet")
        keep = dict(zip(table["key"].to_pylist(), table["keep"].to_pylist()))
        tiles = [t for t in parsed.tiles if t["section"] == f"dedup-{index}"]
        assert tiles and all((t["data-state"] == "kept") == keep[t["data-key"]] for t in tiles)
        for row in {t["row"] for t in tiles}:  # a group: its kept member first, then removed ones
            states = [t["data-state"] for t in tiles if t["row"] == row]
            assert states[0] == "kept" and set(states[1:]) <= {"removed"}
    pairs = [t["data-state"] for t in parsed.tiles if t["section"] == "decontaminate-0"]
    assert pairs == ["eval", "train", "eval", "train"]
    assert any(label.startswith("top 7 of 7 entries") for label in parsed.svgs)
    assert "lineage:" in page["html"]


def test_counts_per_stage(run: dict, page: dict) -> None:
    """Each stage's row: samples in and kept, as the stage's own outputs count them."""
    table = page["html"].split('<section id="counts">', 1)[1].split("</table>", 1)[0]
    cells: dict[str, list] = {}
    for row in table.split("<tr>")[2:]:
        cells.setdefault(row.split("</td>")[0].split(">")[-1], []).append(
            re.findall(r'class="n">([\d,]*)<', row)
        )
    kept, total = pq.read_metadata(run["keep"]).num_rows, run["metadata"].num_rows
    text_kept = pq.read_metadata(run["root"] / "text_keep.parquet").num_rows
    assert [c[:2] for c in cells.pop("filter")] == [
        [f"{total:,}", f"{kept:,}"],
        [f"{len(run['records']):,}", f"{text_kept:,}"],
    ]
    cells = {name: rows[0] for name, rows in cells.items()}
    assert cells["reshard"][1] == f"{kept:,}" and cells["shards"][1] == f"{total:,}"
    assert set(cells) == {"shards", "embed", "metaclip", "dedup", "decontaminate", "reshard"}


def test_bad_inputs_are_one_line(run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = run["root"] / "nothing.parquet"
    capsys.readouterr()
    assert (
        main(["report", "--shards", run["args"][2], "--filter", str(missing), "--output", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing_summary.json: not found" in err[0]
    assert not (tmp_path / "index.html").exists()


def test_same_seed_same_page(run: dict, page: dict, tmp_path: Path) -> None:
    assert main([*run["args"], "--output", str(tmp_path)]) == 0
    assert (tmp_path / "index.html").read_text() == page["html"]


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_page_in_headless_chromium(page: dict, tmp_path: Path) -> None:
    """Loaded as a person would: no console errors, every thumbnail decoded, a screenshot with something on it."""
    with Browser() as browser:
        browser.load(page["path"])
        decoded = browser.evaluate(
            "Promise.all(Array.from(document.images).map("
            "i => i.decode().then(() => [i.complete, i.naturalWidth], () => [false, 0])))"
        )
        shot = browser.screenshot(tmp_path / "report.png")
        assert browser.console_errors() == []
    assert len(decoded) == int(page["parsed"].body["data-images"])
    assert all(complete and width > 0 for complete, width in decoded)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 20  # not blank: text, borders and thumbnails on the page background
