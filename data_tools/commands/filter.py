"""``filter``: a keep list from clip scores and basic image/caption rules."""

from __future__ import annotations

import argparse

from data_tools.commands.options import (
    add_output,
    add_phase_args,
    add_runner_args,
    float_at_least,
    int_at_least,
    runner_options,
)
from data_tools.filter import PRESETS

HELP = "keep list by clip score, size/aspect, caption, language, vocabulary and image-based rules"
DESCRIPTION = (
    "Write a keep list (parquet with uid) of the samples of an embeddings folder (or, for rules that need "
    "no clip score, of the shards themselves) that pass every rule, a summary json, a PNG histogram of "
    "clip scores and, with --language, every sample's language next to it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``filter``."""
    add = parser.add_argument
    add("--embeddings", metavar="DIR|URL", help="from embed (a folder or fsspec URL); needed by score rules")
    score = parser.add_mutually_exclusive_group()
    score.add_argument("--min-score", type=float_at_least(-1.0), metavar="X", help="least clip_score kept")
    score.add_argument("--keep-fraction", type=float_at_least(0.0), metavar="F", help="keep the top F")
    add_output(parser, "FILE|URL", "keep list (a path or fsspec URL)", url=True)
    add("--format", choices=("parquet", "datacomp"), default="parquet", help="datacomp: also FILE.npy")
    add("--min-side", type=int_at_least(1), metavar="N", help="least original image side")
    add("--max-aspect-ratio", type=float_at_least(1.0), metavar="R", help="long/short side")
    add("--min-words", type=int_at_least(0), metavar="N", help="least caption words")
    add("--min-chars", type=int_at_least(0), metavar="N", help="least caption characters")
    add("--language", action="append", type=language_codes, metavar="CODE[,CODE]",
        help="keep captions in these languages (py3langid, ISO 639 codes; repeatable)")  # fmt: skip
    add(
        "--language-min-confidence",
        type=probability,
        metavar="P",
        help="least probability of that language, 0-1",
    )
    add("--vocabulary", metavar="FILE|imagenet",
        help="keep captions holding a term of FILE (one a line; whole words, any case)")  # fmt: skip
    add("--preset", choices=sorted(PRESETS), help="datacomp-basic: DataComp's basic filter; flags override")
    add("--shards", metavar="SPEC",
        help="the shards: filtered straight from them without --embeddings, else where sizes come from")  # fmt: skip
    add("--target", action="append", metavar="ROOT",
        help="image-based: keep the k-means clusters nearest to the images of this eval set or image folder (repeatable)")  # fmt: skip
    add(
        "--clusters",
        type=int_at_least(1),
        metavar="K",
        help="image-based: k-means clusters (None: samples / 128)",
    )
    add_runner_args(parser)
    add_phase_args(parser, partitions=False)


def language_codes(text: str) -> list[str]:
    """An argparse type for ``--language``: one code or a comma list (checked against the model later)."""
    codes = [code.strip().lower() for code in text.split(",")]
    if not all(codes):
        raise argparse.ArgumentTypeError(f"expected language codes such as en or en,de, got {text!r}")
    return codes


def probability(text: str) -> float:
    """An argparse type for a number in [0, 1]."""
    value = float_at_least(0.0)(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"must be at most 1, got {text}")
    return value


def run(args: argparse.Namespace) -> None:
    """Filter (as per-shard tasks) and print what was kept; ranks other than 0 print only their part."""
    from data_tools.filter import preset_config
    from data_tools.filter_tasks import filter_job
    from webshards.spec import expand_urls

    languages = tuple(code for codes in args.language for code in codes) if args.language else None
    rules = dict(min_score=args.min_score, keep_fraction=args.keep_fraction, min_side=args.min_side,
                 max_aspect_ratio=args.max_aspect_ratio, min_words=args.min_words, min_chars=args.min_chars,
                 languages=languages, language_min_confidence=args.language_min_confidence,
                 vocabulary=args.vocabulary, targets=args.target, clusters=args.clusters)  # fmt: skip
    urls = expand_urls(args.shards) if args.shards else None
    cfg, options = preset_config(args.preset, **rules), runner_options(args)
    summary = filter_job(args.embeddings, args.output, cfg, options, args.format, urls)
    if summary is None:
        print(f"filter: this rank's tasks are done; rank 0 writes {args.output}")
        return
    if summary["languages"]:
        top = ", ".join(f"{code} {count}" for code, count in list(summary["languages"].items())[:5])
        print(f"filter: languages (most common first): {top}")
    threshold = summary["score_threshold"]
    print(
        f"filter: kept {summary['kept']} of {summary['samples']} samples ({summary['kept_fraction']:.1%}), "
        f"score threshold {threshold if threshold is None else round(threshold, 4)} -> {args.output}"
    )
    if "image_based" in summary:
        info = summary["image_based"]
        print(f"filter: image-based: {info['kept_clusters']} of {info['clusters']} clusters chosen by "
              f"{info['target_images']} target images")  # fmt: skip
