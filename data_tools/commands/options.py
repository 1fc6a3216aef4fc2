"""What the subcommand parsers share: number types and the options several subcommands take."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from data_tools.runner import DEFAULT_PARTITIONS, DEFAULT_PHASE_TIMEOUT, ENGINES, RunnerOptions


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


def add_output(
    parser: argparse.ArgumentParser, metavar: str = "DIR", help: str = "output folder", url: bool = False
) -> None:
    """The required ``--output`` of a subcommand that writes files; with ``url``, a folder or an fsspec URL
    (kept as text: a ``Path`` would fold ``s3://`` into ``s3:/``)."""
    add_required(parser, "--output", type=str if url else Path, metavar=metavar, help=help)


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--rank``, ``--world``, ``--engine``, ``--ray-address``: how a runner job spreads over
    processes and nodes."""
    add = parser.add_argument
    add(
        "--workers",
        type=int_at_least(1),
        default=1,
        metavar="N",
        help="local processes, one task each at a time",
    )
    add("--rank", type=int_at_least(0), metavar="R", help="this node (default: RANK/SLURM_PROCID, else 0)")
    add("--world", type=int_at_least(1), metavar="W", help="nodes (default: WORLD_SIZE/SLURM_NTASKS, else 1)")
    add(
        "--engine",
        choices=ENGINES,
        default=RunnerOptions.engine,
        help="local: a process pool here; ray: a Ray cluster",
    )
    add("--ray-address", type=ray_address, metavar="auto|HOST:PORT",
        help="the Ray cluster to join (default: RAY_ADDRESS, else a new local Ray)")  # fmt: skip


def ray_address(text: str) -> str:
    """An argparse type for ``--ray-address``: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``."""
    host, sep, port = text.removeprefix("ray://").rpartition(":")
    if text == "auto" or (sep and host and port.isdigit() and 0 < int(port) < 65536):
        return text
    raise argparse.ArgumentTypeError(f"expected auto or HOST:PORT, got {text!r}")


def runner_options(args: argparse.Namespace) -> RunnerOptions:
    """The job's one ``RunnerOptions``, as ``add_runner_args`` (and ``add_phase_args``, where the
    subcommand has them) parsed them."""
    if args.ray_address is not None and args.engine != "ray":
        raise ValueError("--ray-address needs --engine ray")
    phases = {key: value for key, value in vars(args).items() if key in ("partitions", "phase_timeout")}
    return RunnerOptions(args.workers, args.rank, args.world, args.engine, args.ray_address, **phases)


def add_phase_args(parser: argparse.ArgumentParser, partitions: bool = True) -> None:
    """``--partitions`` and ``--phase-timeout`` of a multi-phase job (filter, dedup; see data_tools/phases.py)."""
    add = parser.add_argument
    if partitions:
        add(
            "--partitions",
            type=int_at_least(1),
            default=DEFAULT_PARTITIONS,
            metavar="P",
            help="reduce tasks per phase",
        )
    add(
        "--phase-timeout",
        type=float_at_least(1.0),
        default=DEFAULT_PHASE_TIMEOUT,
        metavar="S",
        help="seconds a node waits for the other ranks to finish a phase",
    )
