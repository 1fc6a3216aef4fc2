"""DataComp's basic and text-based filters (filter.py's caption rules, text_filters.py, filter_shards.py).

References are written here: sentences of known language, a brute-force regex for whole-word vocabulary
matching, DataComp's basic filter as its baselines code defines it, and the shards read back member by
member. The CLI runs on demo shards from the shards alone (no embeddings), locally and as a two-rank split.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_tools.cli import main
from data_tools.embeddings import METADATA_SCHEMA, embedding_files
from data_tools.filter import FilterConfig, preset_config, rule_masks
from data_tools.filter_shards import shard_table
from data_tools.text_filters import IMAGENET, identify_languages, read_vocabulary, vocabulary_mask
from webshards.demo_data import write_demo_data
from webshards.layout import iter_shard

SENTENCES = {
    "en": "The quick brown fox jumps over the lazy dog near the river bank.",
    "fr": "Le chat noir dort tranquillement sur le canapé du salon.",
    "de": "Der kleine Hund spielt im Garten mit einem roten Ball.",
    "es": "El perro pequeño juega en el jardín con una pelota roja.",
    "it": "Il gatto nero dorme tranquillamente sul divano del soggiorno.",
    "pt": "O cachorro pequeno brinca no jardim com uma bola vermelha.",
    "ru": "Маленькая собака играет в саду с красным мячом и радуется солнцу.",
    "ja": "小さな犬が庭で赤いボールで遊んでいます。",
}
SHARDS = 3


def test_language_of_known_sentences() -> None:
    languages, confidence = identify_languages(list(SENTENCES.values()))
    assert languages == list(SENTENCES)
    assert confidence.dtype == np.float32 and ((confidence > 0.5) & (confidence <= 1.0)).all()


def regex_contains(caption: str, terms: list[str]) -> bool:
    """Brute force: any term, its words split by any whitespace, with no word character either side."""
    for term in terms:
        pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, term.split())) + r"(?!\w)"
        if re.search(pattern, caption, re.IGNORECASE):
            return True
    return False


def test_vocabulary_matches_whole_words_like_a_regex(tmp_path: Path) -> None:
    terms = ["cat", "Golden Retriever", "t-shirt", "café", "ice", "c++", "sea lion", "lion"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(terms) + "\n\n")
    pool = ["a", "cat", "category", "Cat.", "cats", "golden", "retriever", "T-Shirt", "cafés", "CAFÉ",
            "ice", "nice", "c++", "c", "sea", "lion", "lions", "_cat", "cat9", "(cat)", "dog", "\n", "  "]  # fmt: skip
    rng = np.random.default_rng(0)
    captions = ["".join(rng.choice(pool, rng.integers(0, 6)) + " ") for _ in range(1500)]
    captions += [" ".join(rng.choice(pool, rng.integers(0, 6))) for _ in range(1500)]
    captions += ["a golden  retriever", "sealion", "the sea\tlion", "", None]
    got = vocabulary_mask(captions, str(vocab))
    expected = [regex_contains(c or "", terms) for c in captions]
    assert got.tolist() == expected
    assert 0.2 < np.mean(expected) < 0.8  # both outcomes well represented


def test_imagenet_vocabulary_is_open_clips_class_names() -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    terms = read_vocabulary(IMAGENET)
    assert set(terms) == {" ".join(name.lower().split()) for name in IMAGENET_CLASSNAMES}
    captions = [
        "a goldfish in a bowl",
        "my tabby cat",
        "a category of things",
        "Great white shark!",
        "nothing",
    ]
    assert vocabulary_mask(captions, IMAGENET).tolist() == [regex_contains(c, terms) for c in captions]


# (caption, the language a person reads in it, original width, height)
ROWS = [
    ("a photo of a dog on the beach", "en", 640, 480),
    ("a large brown dog sitting on a sofa", "en", 200, 600),  # ratio exactly 3: kept
    ("a large brown dog sitting on a sofa", "en", 200, 601),  # ratio over 3
    ("photo of the old church in the village", "en", 199, 400),  # side under 200
    ("Vintage wooden chair for sale", "en", 200, 200),
    ("red car", "en", 800, 800),  # two words
    ("a b c", None, 800, 800),  # three words but five characters
    ("Der kleine Hund spielt im Garten mit einem roten Ball.", "de", 800, 600),
    ("Le chat noir dort tranquillement sur le canapé du salon.", "fr", 800, 600),
    ("The quick brown fox jumps over the lazy dog near the river bank.", "en", 1200, 300),
]


def datacomp_basic(caption: str, language: str | None, width: int, height: int) -> bool:
    """DataComp's basic filter (baselines/apply_filter.py, load_uids_with_basic_filter_helper)."""
    english = language == "en"
    caption_ok = len(caption.split()) > 2 and len(caption) > 5
    aspect_ratio = max(width, height) / min(width, height)
    return english and caption_ok and min(width, height) >= 200 and aspect_ratio <= 3.0


def test_preset_is_datacomps_basic_filter() -> None:
    captions, _, widths, heights = zip(*ROWS)
    uids = [f"{i:032x}" for i in range(len(ROWS))]
    table = pa.table({"uid": uids, "caption": captions, "original_width": widths, "original_height": heights})
    sizes = (np.array(widths, dtype=float), np.array(heights, dtype=float))
    masks = rule_masks(table, preset_config("datacomp-basic"), -math.inf, sizes)
    assert set(masks) == {"min_side", "max_aspect_ratio", "min_words", "min_chars", "language"}
    keep = np.logical_and.reduce(list(masks.values()))
    assert keep.tolist() == [datacomp_basic(*row) for row in ROWS]
    assert [not m.all() for m in masks.values()] == [True] * len(masks)  # every rule removes a row


def test_flags_override_the_preset() -> None:
    cfg = preset_config("datacomp-basic", min_side=64, vocabulary="v.txt", min_score=None)
    assert (cfg.min_side, cfg.min_words, cfg.min_chars, cfg.languages) == (64, 3, 6, ("en",))
    assert cfg.vocabulary == "v.txt" and cfg.max_aspect_ratio == 3.0
    assert FilterConfig(**json.loads(json.dumps(cfg.__dict__))) == cfg  # the summary's config round trip


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """Three demo shards of 200-pixel images (the preset's least side) and a vocabulary file."""
    root = tmp_path_factory.mktemp("demo")
    write_demo_data(root, samples=60, eval_samples=0, image_size=200, samples_per_shard=20, workers=1)
    vocab = root / "vocab.txt"
    vocab.write_text("triangle\nOrange Star\ncircle\n")
    return str(root / "train" / f"{{00000..{SHARDS - 1:05d}}}.tar"), vocab


def shard_samples(spec: str) -> list[dict]:
    """Every sample of the demo shards, read member by member: uid, caption, sizes."""
    rows = []
    for i in range(SHARDS):
        for sample in iter_shard(spec.split("{")[0] + f"{i:05d}.tar"):
            rows.append({**sample["json"], "caption": sample["txt"]})
    return rows


def run_filter(spec: str, vocab: Path, output: Path, *extra: str) -> dict:
    argv = ["filter", "--shards", spec, "--preset", "datacomp-basic", "--vocabulary", str(vocab)]
    assert main([*argv, "--output", str(output), *extra]) == 0
    if not output.exists():
        return {}
    return json.loads(output.with_name(output.stem + "_summary.json").read_text())


@pytest.fixture(scope="module")
def local_run(demo, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("local") / "keep.parquet"
    return output, run_filter(*demo, output)


def test_cli_preset_and_vocabulary_on_demo_shards(demo, local_run) -> None:
    import py3langid

    spec, vocab = demo
    output, summary = local_run
    terms = vocab.read_text().split("\n")[:3]
    rows = shard_samples(spec)
    language = {r["uid"]: py3langid.classify(r["caption"])[0] for r in rows}  # upstream, top-1
    expected = [
        r["uid"]
        for r in rows
        if datacomp_basic(r["caption"], language[r["uid"]], r["original_width"], r["original_height"])
        and regex_contains(r["caption"], terms)
    ]
    kept = pq.read_table(output)["uid"].to_pylist()
    assert kept == expected and 0 < len(kept) < len(rows)
    assert not output.with_name("keep_scores.png").exists()  # no scores without --embeddings

    languages = pq.read_table(output.with_name("keep_languages.parquet")).to_pylist()
    assert [(r["uid"], r["language"]) for r in languages] == [(r["uid"], language[r["uid"]]) for r in rows]
    assert all(0.0 < r["language_confidence"] <= 1.0 for r in languages)
    counts = {code: [r["language"] for r in languages].count(code) for code in set(language.values())}
    assert summary["languages"] == counts and summary["samples"] == len(rows) == 60
    assert list(summary["failed_rule"]) == ["min_side", "max_aspect_ratio", "min_words", "min_chars",
                                            "language", "vocabulary"]  # fmt: skip

    # the summary's config reproduces the decision through the one rule function
    cfg = FilterConfig(**summary["config"])
    table = pa.concat_tables(shard_table(spec.split("{")[0] + f"{i:05d}.tar") for i in range(SHARDS))
    sizes = (
        table["original_width"].to_numpy().astype(float),
        table["original_height"].to_numpy().astype(float),
    )
    masks = rule_masks(table, cfg, -math.inf, sizes)
    assert table["uid"].filter(pa.array(np.logical_and.reduce(list(masks.values())))).to_pylist() == kept
    assert {rule: int((~m).sum()) for rule, m in masks.items()} == summary["failed_rule"]


def test_two_ranks_write_the_local_files(demo, local_run, tmp_path: Path) -> None:
    output = tmp_path / "ranks" / "keep.parquet"
    assert run_filter(*demo, output, "--rank", "1", "--world", "2") == {}  # rank 1: its tasks only
    summary = run_filter(*demo, output, "--rank", "0", "--world", "2")
    local, local_summary = local_run
    for name in ("keep.parquet", "keep_languages.parquet"):
        assert pq.read_table(output.with_name(name)) == pq.read_table(local.with_name(name))
    assert {**summary, "keep_list": ""} == {**local_summary, "keep_list": ""}
    assert sorted(p.name for p in output.parent.iterdir()) == [
        "keep.parquet",
        "keep_languages.parquet",
        "keep_lineage.json",
        "keep_summary.json",
    ]


def test_with_embeddings_the_text_rules_read_the_metadata(demo, local_run, tmp_path: Path) -> None:
    """An embeddings folder made of the shards' rows plus scores: score and text rules together keep the
    shards-only run's uids whose score passes."""
    spec, vocab = demo
    rng = np.random.default_rng(1)
    for i in range(SHARDS):
        rows = shard_table(spec.split("{")[0] + f"{i:05d}.tar").to_pylist()
        rows = [{**row, "clip_score": float(rng.uniform(0.0, 0.5))} for row in rows]
        path = embedding_files(tmp_path / "emb", i).metadata
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=METADATA_SCHEMA), path)
    output = tmp_path / "keep.parquet"
    summary = run_filter(spec, vocab, output, "--embeddings", str(tmp_path / "emb"), "--min-score", "0.25")
    scores = {r["uid"]: r["clip_score"] for p in sorted((tmp_path / "emb").rglob("*.parquet"))
              for r in pq.read_table(p).to_pylist()}  # fmt: skip
    text_kept = pq.read_table(local_run[0])["uid"].to_pylist()
    assert pq.read_table(output)["uid"].to_pylist() == [u for u in text_kept if scores[u] >= 0.25]
    assert summary["languages"] == local_run[1]["languages"]
    assert output.with_name("keep_scores.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vocabulary", "MISSING"], "vocabulary file MISSING does not exist"),
        (["--language", "en,xx"], "language 'xx' is not one of py3langid's codes"),
        ([], "filter: no rule given"),
        (["--min-score", "0.2"], "--min-score and --keep-fraction need clip scores: pass --embeddings"),
        (["--language-min-confidence", "0.5"], "language_min_confidence must be in [0, 1] with languages"),
    ],
)
def test_bad_rules_are_one_line(demo, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    spec, _ = demo
    missing = str(tmp_path / "MISSING")
    args = [missing if a == "MISSING" else a for a in args]
    assert main(["filter", "--shards", spec, *args, "--output", str(tmp_path / "keep.parquet")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.replace("MISSING", missing) in err[0]
    assert not (tmp_path / "keep.parquet").exists()
