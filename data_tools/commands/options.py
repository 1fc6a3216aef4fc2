"""What the subcommand parsers share: number types and the options several subcommands take."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for integers no smaller than ``minimum``."""
    return _at_least(int, "an integer", minimum)


def float_at_least(minimum: float) -> Callable[[str], float]:
    """An argparse type for numbers no smaller than ``minimum``."""
    return _at_least(float, "a number", minimum)


def _at_least(convert: Callable[[str], Any], noun: str, minimum: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        if not value >= minimum:  # also rejects nan
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


def add_required(parser: argparse.ArgumentParser, flag: str, **kwargs: Any) -> None:
    """A required option; ``--help`` shows no default for it."""
    parser.add_argument(flag, required=True, default=argparse.SUPPRESS, **kwargs)


def add_output(parser: argparse.ArgumentParser, metavar: str = "DIR", help: str = "output folder") -> None:
    """The required ``--output`` of a subcommand that writes files."""
    add_required(parser, "--output", type=Path, metavar=metavar, help=help)


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--rank``, ``--world``: how a runner job spreads over processes and nodes."""
    add = parser.add_argument
    add("--workers", type=int_at_least(1), default=1, metavar="N", help="processes, one task each at a time")
    add("--rank", type=int_at_least(0), metavar="R", help="this node (default: RANK/SLURM_PROCID, else 0)")
    add("--world", type=int_at_least(1), metavar="W", help="nodes (default: WORLD_SIZE/SLURM_NTASKS, else 1)")


def runner_options(args: argparse.Namespace) -> dict[str, int | None]:
    """The ``workers``, ``rank`` and ``world`` keywords of a runner job, as ``add_runner_args`` parsed them."""
    return {"workers": args.workers, "rank": args.rank, "world": args.world}


def add_phase_args(parser: argparse.ArgumentParser, partitions: bool = True) -> None:
    """``--partitions`` and ``--phase-timeout`` of a multi-phase job (filter, dedup; see data_tools/phases.py)."""
    add = parser.add_argument
    if partitions:
        add("--partitions", type=int_at_least(1), default=16, metavar="P", help="reduce tasks per phase")
    add(
        "--phase-timeout",
        type=float_at_least(1.0),
        default=86400.0,
        metavar="S",
        help="seconds a node waits for the other ranks to finish a phase",
    )
