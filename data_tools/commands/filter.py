"""``filter``: a keep list from clip scores and basic image/caption rules."""

from __future__ import annotations

import argparse

from data_tools.commands.options import (
    add_output,
    add_phase_args,
    add_required,
    add_runner_args,
    float_at_least,
    int_at_least,
    runner_options,
)

HELP = "keep list by clip score threshold or top fraction, size/aspect/caption rules, image-based clusters"
DESCRIPTION = (
    "Write a keep list (parquet with uid) of the samples of an embeddings folder that pass "
    "every rule, a summary json and a PNG histogram of clip scores next to it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``filter``."""
    add = parser.add_argument
    add_required(parser, "--embeddings", metavar="DIR|URL", help="from embed (a folder or fsspec URL)")
    score = parser.add_mutually_exclusive_group()
    score.add_argument("--min-score", type=float_at_least(-1.0), metavar="X", help="least clip_score kept")
    score.add_argument("--keep-fraction", type=float_at_least(0.0), metavar="F", help="keep the top F")
    add_output(parser, "FILE|URL", "keep list (a path or fsspec URL)", url=True)
    add("--format", choices=("parquet", "datacomp"), default="parquet", help="datacomp: also FILE.npy")
    add("--min-side", type=int_at_least(1), metavar="N", help="least original image side")
    add("--max-aspect-ratio", type=float_at_least(1.0), metavar="R", help="long/short side")
    add("--min-words", type=int_at_least(0), metavar="N", help="least caption words")
    add("--shards", metavar="SPEC", help="the embedded shards, when sizes must come from them")
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


def run(args: argparse.Namespace) -> None:
    """Filter (as per-shard tasks) and print what was kept; ranks other than 0 print only their part."""
    from data_tools.filter import FilterConfig
    from data_tools.filter_tasks import filter_job
    from webshards.spec import expand_urls

    rules = (args.min_score, args.keep_fraction, args.min_side, args.max_aspect_ratio, args.min_words)
    urls = expand_urls(args.shards) if args.shards else None
    image_based = {"targets": tuple(args.target or ()), "clusters": args.clusters}
    cfg, options = FilterConfig(*rules, **image_based), runner_options(args)
    summary = filter_job(args.embeddings, args.output, cfg, options, args.format, urls)
    if summary is None:
        print(f"filter: this rank's tasks are done; rank 0 writes {args.output}")
        return
    threshold = summary["score_threshold"]
    print(
        f"filter: kept {summary['kept']} of {summary['samples']} samples ({summary['kept_fraction']:.1%}), "
        f"score threshold {threshold if threshold is None else round(threshold, 4)} -> {args.output}"
    )
    if "image_based" in summary:
        info = summary["image_based"]
        print(f"filter: image-based: {info['kept_clusters']} of {info['clusters']} clusters chosen by "
              f"{info['target_images']} target images")  # fmt: skip
