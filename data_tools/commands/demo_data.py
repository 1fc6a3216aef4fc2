"""``demo-data``: write the procedural coloured-shapes image-text set."""

from __future__ import annotations

import argparse
import time

from data_tools.commands.options import add_output, int_at_least

HELP = "write the procedural demo image-text set (train/ and eval/ shards)"
DESCRIPTION = "Write 32 classes of coloured shapes with varied captions as img2dataset shards."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``demo-data``."""
    add = parser.add_argument
    add_output(parser)
    add("--samples", type=int_at_least(1), default=64000, metavar="N", help="training samples")
    add("--eval-samples", type=int_at_least(0), default=1600, metavar="N", help="held-out eval samples")
    add("--image-size", type=int_at_least(16), default=64, metavar="N", help="image side in pixels")
    add("--samples-per-shard", type=int_at_least(1), default=4000, metavar="N", help="samples per tar")
    add("--seed", type=int_at_least(0), default=0, metavar="N", help="same seed, same bytes")
    add("--workers", type=int_at_least(1), default=2, metavar="N", help="processes writing shards")
    add("--adapt-samples", type=int_at_least(0), default=0, metavar="N",
        help="also write adapt/: a labelled train split of N new images and the held-out images as test "
        "(clip_benchmark layout), the --train set of `pretrain adapt`")  # fmt: skip
    add(
        "--domain",
        choices=["default", "new"],
        default="default",
        help="default: 8 colours x 4 shapes (32 classes); new: pink/cyan/brown/grey x pentagon/hexagon/"
        "diamond/ring (16 classes the default never shows, for continued-pretraining experiments)",
    )


def run(args: argparse.Namespace) -> None:
    """Write the demo set and print a short summary."""
    from webshards.demo_data import write_demo_data

    start = time.perf_counter()
    info = write_demo_data(
        args.output,
        samples=args.samples,
        eval_samples=args.eval_samples,
        image_size=args.image_size,
        samples_per_shard=args.samples_per_shard,
        seed=args.seed,
        workers=args.workers,
        domain=args.domain,
        adapt_samples=args.adapt_samples,
    )
    seconds = time.perf_counter() - start
    print(
        f"demo data in {args.output}: train {info['samples']} samples (shards: {info['train_shards']}), "
        f"eval {info['eval_samples']} samples (shards: {info['eval_shards']}), {info['classes']} classes; "
        f"shards written: {info['shards_written']}, skipped: {info['shards_skipped']}; {seconds:.1f} s"
    )
