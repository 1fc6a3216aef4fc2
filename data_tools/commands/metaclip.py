"""``metaclip``: MetaCLIP curation, a keep list balanced over metadata entries."""

from __future__ import annotations

import argparse

from data_tools.commands.options import (
    add_output,
    add_phase_args,
    add_required,
    add_runner_args,
    int_at_least,
    runner_options,
)
from data_tools.metaclip.config import MATCH_MODES

HELP = "MetaCLIP curation: match captions to metadata entries, balance head entries down to t"
DESCRIPTION = (
    "Match every caption against an entries file (one entry per line), count pairs per entry over the "
    "whole pool and keep each pair with MetaCLIP's balancing probability (min(1, t / count) per matched "
    "entry; a pair matching no entry is dropped). Writes the keep list (parquet with uid), "
    "FILE_entry_counts.json and FILE_entry_counts.png beside it."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``metaclip``."""
    add = parser.add_argument
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--shards", metavar="SPEC", help="input shards (captions from KEY.txt)")
    source.add_argument("--embeddings", metavar="DIR|URL", help="or: captions from embed's metadata")
    add_required(parser, "--entries", metavar="FILE|URL", help="metadata entries, one per line (UTF-8)")
    add_required(
        parser,
        "--t",
        type=int_at_least(1),
        metavar="N",
        help="the cap: an entry matched by more than N pairs keeps each with probability N / count",
    )
    add_output(parser, "FILE|URL", "keep list (a path or fsspec URL)", url=True)
    add("--seed", type=int_at_least(0), default=0, metavar="S", help="seed of the balancing draws")
    add("--match", choices=MATCH_MODES, default=MATCH_MODES[0],
        help="substring: entry in caption (Algorithm 1); words: whole words, as MetaCLIP's released code")  # fmt: skip
    add_runner_args(parser)
    add_phase_args(parser, partitions=False)


def run(args: argparse.Namespace) -> None:
    """Match, count, balance (as task phases) and print what was kept."""
    from data_tools.metaclip import MetaclipConfig, metaclip_job
    from data_tools.metaclip.inputs import metadata_inputs
    from webshards.spec import expand_urls

    cfg = MetaclipConfig(str(args.entries), args.t, args.seed, args.match)
    inputs = expand_urls(args.shards) if args.shards else metadata_inputs(args.embeddings)
    report = metaclip_job(inputs, args.output, cfg, runner_options(args))
    if report is None:
        print(f"metaclip: this rank's tasks are done; rank 0 writes {args.output}")
        return
    print(
        f"metaclip: {report['matched']} of {report['pool']} pairs matched {report['entries_matched']} of "
        f"{report['entries']} entries ({report['head_entries']} above t={args.t}); kept {report['kept']} "
        f"({report['kept_fraction']:.1%}) -> {args.output}"
    )
