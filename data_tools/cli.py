"""The ``data-tools`` command: parse arguments and dispatch to one subcommand per curation step."""

from __future__ import annotations

import argparse
import logging
import sys

from data_tools.commands import (
    build,
    decontaminate,
    dedup,
    demo_data,
    embed,
    eval_set,
    filter,
    keep,
    lineage,
    metaclip,
    report,
    reshard,
    stats,
)
from data_tools.phases import JobFailed
from data_tools.runner import RunSummary
from webshards.args import CommandLine
from webshards.retries import StoreUnreachable

PROG = "data-tools"


def setup_logging() -> None:
    """data_tools (and the shard layer under it) log progress summaries at INFO: bare lines on stderr."""
    logging.basicConfig(format="%(message)s")
    for name in ("data_tools", "webshards"):
        logging.getLogger(name).setLevel(logging.INFO)


def job_status(summary: RunSummary) -> int:
    """The exit status of a runner job: 1 when tasks failed (the runner logged which and why), else 0."""
    if summary.ok():
        return 0
    print(
        f"{PROG}: error: {len(summary.failed)} task(s) failed, see above; rerun to retry them",
        file=sys.stderr,
    )
    return 1


COMMAND_LINE = CommandLine(
    prog=PROG,
    description="Curate image-text data into WebDataset shards.",
    commands=(
        demo_data,
        build,
        reshard,
        stats,
        embed,
        filter,
        dedup,
        keep,
        decontaminate,
        metaclip,
        eval_set,
        report,
        lineage,
    ),  # in --help order
    # JobFailed: the job ran and failed (which task, or which rank's work never arrived); StoreUnreachable: a
    # store stayed down through every retry (a rerun may succeed); a ValueError: invalid inputs, found before
    # or while running
    errors=((JobFailed, 1), (StoreUnreachable, 1), (ValueError, 2)),
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,  # every option's default in its --help
    status=job_status,  # a runner job's run returns its RunSummary
)


def main(argv: list[str] | None = None) -> int:
    """Run ``data-tools``; returns the exit status: 0 on success, 2 when what the command was given is wrong
    (a flag, a value, an input that is missing or unreadable, an output holding another job's settings), 1 when
    the work itself failed (tasks failed, other ranks never finished a phase), 130 on Ctrl-C."""
    setup_logging()
    return COMMAND_LINE.main(argv)


if __name__ == "__main__":
    sys.exit(main())
