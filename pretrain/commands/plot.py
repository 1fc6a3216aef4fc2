"""`pretrain plot`: a run's metrics.jsonl drawn as curves."""

from __future__ import annotations

import argparse

HELP = "draw a run's metrics.jsonl as curves.png"
DESCRIPTION = (
    "Draw loss (and its parts), lr, samples/s, data wait and every eval metric against the step, one panel "
    "each, from RUN_DIR/metrics.jsonl."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `plot`."""
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    parser.add_argument("--output", metavar="PNG", help="image to write (default: RUN_DIR/curves.png)")


def run(args: argparse.Namespace) -> None:
    """Draw and say where, with the panels' titles."""
    from pretrain.training.plot import plot_run

    path, titles = plot_run(args.run_dir, args.output)
    print(f"wrote {path} ({len(titles)} panels: {', '.join(titles)})")
