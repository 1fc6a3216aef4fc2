"""``reshard``: the samples selected by keep lists -> new shards of a chosen size."""

from __future__ import annotations

import argparse

from data_tools.commands.options import (
    add_output,
    add_required,
    add_runner_args,
    int_at_least,
    runner_options,
)
from data_tools.runner import RunSummary

HELP = "write the samples selected by keep lists into new shards"
DESCRIPTION = (
    "Copy the samples whose uid is in every keep list (a uid listed k times is written k "
    "times) into new shards. Resumable; the output does not depend on --workers or nodes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``reshard``."""
    add = parser.add_argument
    add_required(
        parser, "--shards", metavar="SPEC", help="input shards (paths or URLs), e.g. 'in/{00000..00009}.tar'"
    )
    keep_help = "keep list (parquet with uid, or DataComp .npy), a path or URL; repeat to intersect"
    add_required(parser, "--keep", type=keep_list, action="append", metavar="FILE|URL", help=keep_help)
    add_output(parser, "DIR|URL", "output folder or fsspec URL (s3://bucket/prefix)", url=True)
    add(
        "--samples-per-shard",
        type=int_at_least(1),
        default=10000,
        metavar="N",
        help="samples per output shard",
    )
    shuffle_help = "shuffle within windows of N samples (0: keep order)"
    add("--shuffle-buffer", type=int_at_least(0), default=0, metavar="N", help=shuffle_help)
    add("--seed", type=int_at_least(0), default=0, metavar="S", help="seed of the shuffle")
    add_runner_args(parser)


def keep_list(text: str) -> str:
    """An argparse type for ``--keep``: a keep list that is there, kept as text (a ``Path`` would fold
    ``s3://`` into ``s3:/``). A missing list is a bad argument: one line naming it, exit status 2."""
    from webshards import outputs
    from webshards.urls import redact_url

    try:
        found = outputs.exists(text)
    except ValueError as error:  # a URL nothing can reach: its reason, not argparse's "invalid value"
        raise argparse.ArgumentTypeError(str(error)) from None
    except OSError as error:  # e.g. the store refused the credentials
        raise argparse.ArgumentTypeError(redact_url(f"keep list not readable: {text} ({error})")) from None
    if not found:
        raise argparse.ArgumentTypeError(f"keep list not found: {redact_url(text)}")
    return text


def run(args: argparse.Namespace) -> RunSummary:
    """Reshard and print where the new shards are."""
    from data_tools.reshard import reshard
    from webshards.outputs import describe_shards

    summary = reshard(
        args.shards,
        args.keep,
        args.output,
        args.samples_per_shard,
        args.shuffle_buffer,
        args.seed,
        runner_options(args),
    )
    print(f"reshard: {describe_shards(args.output)}")
    return summary
