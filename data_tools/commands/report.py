"""``report``: a static HTML page to look at a curation run."""

from __future__ import annotations

import argparse

from data_tools.commands.options import add_output, add_required, int_at_least

HELP = "write a static HTML page showing what each curation stage kept and removed"
DESCRIPTION = (
    "Write DIR/index.html, one self-contained page (thumbnails inline, no server): counts per stage, kept "
    "and removed samples per filter rule, a row per CLIP-score decile, duplicate groups, decontamination "
    "pairs, language and MetaCLIP entry distributions. Each input adds its sections; all but --shards are "
    "optional, and every repeatable one may be given several times."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``report``."""
    add = parser.add_argument
    add_required(parser, "--shards", metavar="SPEC", help="the shards the run started from (the images)")
    add("--embeddings", metavar="DIR|URL", help="from embed: filter decisions and CLIP-score deciles")
    add("--filter", action="append", default=[], metavar="KEEP_FILE", help="a filter keep list")
    add("--dedup", action="append", default=[], metavar="DIR", help="a dedup output folder")
    add("--decontaminate", action="append", default=[], metavar="DIR", help="a decontaminate output folder")
    add("--metaclip", action="append", default=[], metavar="KEEP_FILE", help="a metaclip keep list")
    add("--reshard", action="append", default=[], metavar="DIR", help="a reshard output folder (counts)")
    add("--samples-per-group", type=int_at_least(1), default=8, metavar="N", help="thumbnails per row")
    add("--thumbnail-size", type=int_at_least(16), default=128, metavar="PX", help="thumbnail long side")
    add("--seed", type=int_at_least(0), default=0, metavar="S", help="which samples are drawn")
    add_output(parser, "DIR|URL", "folder for index.html (a path or fsspec URL)", url=True)


def run(args: argparse.Namespace) -> None:
    """Build the page and print where it is and what it holds."""
    from data_tools.report import ReportConfig, write_report

    inputs = (args.filter, args.dedup, args.decontaminate, args.metaclip, args.reshard)
    options = (args.samples_per_group, args.seed, args.thumbnail_size)
    cfg = ReportConfig(args.shards, args.embeddings, *map(tuple, inputs), *options)
    done = write_report(cfg, args.output)
    missing = f", {done['missing']} not found" if done["missing"] else ""
    print(
        f"report: {len(done['sections'])} sections, {done['images']} thumbnails{missing}, "
        f"{done['bytes'] / 1024:.0f} KiB -> {done['path']} ({done['seconds']:.1f} s)"
    )
