"""``dedup``: exact, perceptual or semantic duplicate groups and a keep list."""

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
from data_tools.dedup import KEEP_POLICIES, METHODS

HELP = "find exact (sha256), perceptual (pHash) or semantic (SemDeDup) duplicates"
DESCRIPTION = (
    "Group duplicates and keep one per group: writes DIR/duplicates.parquet (key, uid, group, "
    "keep), DIR/keep.parquet and DIR/report.json."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``dedup``."""
    policies = sorted({p for names in KEEP_POLICIES.values() for p in names})
    add = parser.add_argument
    add("--shards", metavar="SPEC", help="input shards (exact, perceptual)")
    add_required(parser, "--method", choices=METHODS, help="duplicate kind")
    add("--embeddings", metavar="DIR|URL", help="from embed (semantic; a folder or fsspec URL)")
    add("--threshold", type=float_at_least(0.0), metavar="T", help="perceptual: bits (10); semantic: eps")
    add_output(parser, "DIR|URL", "output folder or fsspec URL (s3://bucket/prefix)", url=True)
    add("--keep-policy", choices=policies, help="which member of a group to keep (see docs)")
    add("--with-caption", action="store_true", help="exact: the normalised caption must match too")
    add("--clusters", type=int_at_least(1), metavar="K", help="semantic: k-means clusters")
    add("--probes", type=int_at_least(1), default=3, metavar="N", help="semantic: clusters checked per item")
    add("--seed", type=int_at_least(0), default=0, metavar="S", help="semantic: k-means seed")
    add_runner_args(parser)
    add_phase_args(parser)


def run(args: argparse.Namespace) -> None:
    """Deduplicate and print the totals."""
    from data_tools.dedup import DedupConfig, find_duplicates
    from webshards.spec import expand_urls

    options = (args.threshold, args.keep_policy, args.with_caption, args.clusters, args.probes, args.seed)
    cfg = DedupConfig(args.method, *options)
    urls = expand_urls(args.shards) if args.shards else None
    report = find_duplicates(args.output, cfg, runner_options(args), urls, args.embeddings)
    if report is None:
        print(f"dedup ({args.method}): this rank's tasks are done; rank 0 writes {args.output}")
        return
    print(
        f"dedup ({args.method}): {report['items']} items, {report['groups']} duplicate groups, "
        f"{report['removed']} removed, {report['kept']} kept -> {args.output}/keep.parquet "
        f"({report['seconds']:.1f} s)"
    )
