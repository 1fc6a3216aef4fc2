"""``stats``: counts and distributions of a set of shards."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_tools.commands.options import add_required

HELP = "print counts and distributions (image size, caption length, clip score) of shards"
DESCRIPTION = (
    "Count samples and failures by status and summarise image sizes, caption lengths and "
    "(with --embeddings) clip scores. With --output, also write stats.json and PNG histograms."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``stats``."""
    add = parser.add_argument
    add_required(
        parser, "--shards", metavar="SPEC", help="shards (paths or URLs), e.g. 'out/{00000..00009}.tar'"
    )
    embeddings_help = "embeddings folder or URL (metadata/*.parquet with clip_score)"
    add("--embeddings", metavar="DIR|URL", help=embeddings_help)  # text: a Path folds s3:// into s3:/
    add("--output", type=Path, metavar="DIR", help="write stats.json and histograms here")


def run(args: argparse.Namespace) -> None:
    """Print the stats table; write the report files with ``--output``."""
    from data_tools.stats import format_table, gather, write_report

    stats = gather(args.shards, args.embeddings)
    print(format_table(stats))
    if args.output is not None:
        files = write_report(stats, args.output)
        print(f"stats: wrote {len(files)} files to {args.output}/")
