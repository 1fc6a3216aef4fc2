"""The ``data-tools`` command: parse arguments and dispatch to one subcommand per curation step."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

PROG = "data-tools"


class ArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message}\n")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type for integers no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def add_demo_data(subparsers: argparse._SubParsersAction) -> None:
    """``demo-data``: write the procedural coloured-shapes image-text set."""
    parser = subparsers.add_parser(
        "demo-data",
        help="write the procedural demo image-text set (train/ and eval/ shards)",
        description="Write 32 classes of coloured shapes with varied captions as img2dataset shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--output", type=Path, required=True, default=argparse.SUPPRESS, metavar="DIR", help="output folder")
    add("--samples", type=int_at_least(1), default=64000, metavar="N", help="training samples")
    add("--eval-samples", type=int_at_least(0), default=1600, metavar="N", help="held-out eval samples")
    add("--image-size", type=int_at_least(16), default=64, metavar="N", help="image side in pixels")
    add("--samples-per-shard", type=int_at_least(1), default=4000, metavar="N", help="samples per tar")
    add("--seed", type=int_at_least(0), default=0, metavar="N", help="same seed, same bytes")
    add("--workers", type=int_at_least(1), default=2, metavar="N", help="processes writing shards")
    parser.set_defaults(run=run_demo_data)


def run_demo_data(args: argparse.Namespace) -> None:
    """Write the demo set and print a short summary."""
    from data_tools.demo import write_demo_data  # imported here so `--help` stays fast

    start = time.perf_counter()
    info = write_demo_data(
        args.output,
        samples=args.samples,
        eval_samples=args.eval_samples,
        image_size=args.image_size,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        workers=args.workers,
    )
    seconds = time.perf_counter() - start
    print(
        f"demo data in {args.output}: train {info['samples']} samples (shards: {info['train_shards']}), "
        f"eval {info['eval_samples']} samples (shards: {info['eval_shards']}), {info['classes']} classes; "
        f"shards written: {info['shards_written']}, skipped: {info['shards_skipped']}; {seconds:.1f} s"
    )


def build_parser() -> ArgumentParser:
    """The parser for every subcommand."""
    parser = ArgumentParser(prog=PROG, description="Curate image-text data into WebDataset shards.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_demo_data(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``data-tools``; returns the exit status (0 on success, 2 on bad arguments, 1 on errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad argument (2): already printed
        return exit_.code if isinstance(exit_.code, int) else 1
    try:
        args.run(args)
    except ValueError as error:  # invalid inputs found while running: one line, no traceback
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
