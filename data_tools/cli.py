"""The ``data-tools`` command: parse arguments and dispatch to one subcommand per curation step."""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from data_tools.commands import build, dedup, demo_data, embed, eval_set, filter, reshard, stats
from data_tools.phases import JobFailed
from data_tools.runner import RunSummary
from webshards.args import OneLineParser

PROG = "data-tools"
COMMANDS = {
    "demo-data": demo_data,
    "build": build,
    "reshard": reshard,
    "stats": stats,
    "embed": embed,
    "filter": filter,
    "dedup": dedup,
    "eval-set": eval_set,
}
"""Each subcommand's module (``HELP``, ``DESCRIPTION``, ``add_arguments``, ``run``), in ``--help`` order."""


def build_parser() -> OneLineParser:
    """The parser for every subcommand."""
    parser = OneLineParser(prog=PROG, description="Curate image-text data into WebDataset shards.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        add_command(subparsers, name, command)
    return parser


def add_command(subparsers: argparse._SubParsersAction, name: str, command: ModuleType) -> None:
    """Subcommand ``name`` as its module declares it; its ``--help`` shows every option's default."""
    parser = subparsers.add_parser(
        name,
        help=command.HELP,
        description=command.DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    command.add_arguments(parser)
    parser.set_defaults(run=command.run)


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


def main(argv: list[str] | None = None) -> int:
    """Run ``data-tools``; returns the exit status: 0 on success, 2 when what the command was given is wrong
    (a flag, a value, an input that is missing or unreadable, an output holding another job's settings), 1 when
    the work itself failed (tasks failed, other ranks never finished a phase). `pretrain` follows the same rule."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad argument (2): already printed
        return exit_.code if isinstance(exit_.code, int) else 1
    setup_logging()
    try:
        summary = args.run(args)  # a runner job's RunSummary, else None
    except (ValueError, JobFailed) as error:  # one line, no traceback
        print(f"{PROG}: error: {error}", file=sys.stderr)
        # a ValueError: invalid inputs, found before or while running; JobFailed: the job ran and failed
        # (which task, or which rank's work never arrived)
        return 1 if isinstance(error, JobFailed) else 2
    except KeyboardInterrupt as error:  # Ctrl-C: one line (a runner job says how far it got), no traceback
        print(f"{PROG}: interrupted{f': {error}' if str(error) else ''}", file=sys.stderr)
        return 130
    return 0 if summary is None else job_status(summary)


if __name__ == "__main__":
    sys.exit(main())
