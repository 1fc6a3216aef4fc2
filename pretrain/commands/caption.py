"""`pretrain caption`: images or shards in, one JSON line per caption out (CoCa checkpoints)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from pretrain.generate.decoding import METHODS, DecodingConfig

HELP = "caption images with a CoCa checkpoint (open_clip generate's decoding)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `caption`; the decoding defaults are `DecodingConfig`'s."""
    add, d = parser.add_argument, DecodingConfig()
    add("--checkpoint", required=True, help="checkpoint folder, run directory, or export folder")
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", metavar="FILE", help="image files (lines carry their path)")
    inputs.add_argument("--shards", metavar="SPEC", help="WebDataset shards, e.g. 'data/{00000..00009}.tar'")
    add("--decoding", dest="method", choices=METHODS, default=d.method, help="default: %(default)s")
    add("--max-length", type=int, default=d.max_length,
        help="most tokens per caption, start/end tokens included (default: %(default)s, as open_clip generate)")  # fmt: skip
    add("--min-length", type=int, default=d.min_length, help="default: %(default)s")
    add("--num-beams", type=int, default=d.num_beams, help="default: %(default)s")
    add("--num-beam-groups", type=int, default=d.num_beam_groups, help="default: %(default)s")
    add("--top-k", type=int, default=d.top_k, help="default: %(default)s")
    add("--top-p", type=float, default=d.top_p, help="default: %(default)s")
    add("--temperature", type=float, default=d.temperature, help="sampling; default: %(default)s")
    add("--repetition-penalty", type=float, default=d.repetition_penalty)
    add("--seed", type=int, default=0, help="torch seed for sampling (default: %(default)s)")
    add("--batch-size", type=int, default=16)
    add("--device", default="cpu", choices=["cpu", "cuda"])
    add("--output", help="JSON lines file to write (default: standard output)")


def run(args: argparse.Namespace) -> None:
    """Caption every image; progress on stderr, since stdout may be the captions."""
    from pretrain.generate.caption import write_captions
    from pretrain.training.metrics import setup_logging

    setup_logging(is_main=True, stream=sys.stderr)
    config = DecodingConfig(**{field.name: getattr(args, field.name) for field in fields(DecodingConfig)})
    count = write_captions(
        args.checkpoint,
        args.output,
        config,
        args.images,
        args.shards,
        args.batch_size,
        args.device,
        args.seed,
    )
    if args.output:
        print(f"wrote {count} captions to {args.output}", file=sys.stderr)
