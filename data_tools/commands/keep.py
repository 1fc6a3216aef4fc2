"""``keep``: union, intersection or difference of keep lists."""

from __future__ import annotations

import argparse

from data_tools.commands.options import add_output

HELP = "union, intersection or difference of keep lists (parquet or DataComp .npy)"
DESCRIPTION = (
    "Combine keep lists into one parquet keep list, counting repeated uids as reshard does: --intersect "
    "keeps uids in every list (smallest count), --union uids in any list (largest count), --subtract the "
    "first list's uids that no later list holds."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``keep``."""
    operation = parser.add_mutually_exclusive_group(required=True)
    for name, what in (
        ("union", "in any list"),
        ("intersect", "in every list"),
        ("subtract", "of the first only"),
    ):
        operation.add_argument(
            f"--{name}", nargs="+", metavar="FILE|URL", help=f"keep lists: the uids {what}"
        )
    add_output(parser, "FILE|URL", "the combined keep list (parquet)", url=True)
    parser.add_argument(
        "--format", choices=("parquet", "datacomp"), default="parquet", help="datacomp: also FILE.npy"
    )


def run(args: argparse.Namespace) -> None:
    """Combine the lists and print the counts of each and of the result."""
    from data_tools.keeplists import combine, read_keep_list, write_keep_list
    from webshards.lineage import write_lineage

    operation = next(name for name in ("union", "intersect", "subtract") if getattr(args, name))
    files = getattr(args, operation)
    lists = [read_keep_list(f) for f in files]
    values, counts = combine(operation, lists)
    rows = write_keep_list(args.output, values, counts, args.format)
    tally = {"samples_out": rows, "distinct": len(values), "lists": [int(c.sum()) for _, c in lists]}
    write_lineage(args.output, "keep", params={"operation": operation}, inputs={"keep": files}, counts=tally)
    sizes = ", ".join(f"{f}: {int(c.sum())} uids ({len(v)} distinct)" for f, (v, c) in zip(files, lists))
    print(f"keep: {operation} of {sizes} -> {rows} uids ({len(values)} distinct) -> {args.output}")
