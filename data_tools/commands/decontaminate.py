"""``decontaminate``: a keep list without the training pairs that duplicate eval-set images, and a report."""

from __future__ import annotations

import argparse

from data_tools.commands.options import (
    add_output,
    add_phase_args,
    add_required,
    add_runner_args,
    float_at_least,
    int_at_least,
    runner_options,
)
from data_tools.decontam import METHODS

HELP = "remove training pairs whose image duplicates an eval-set image (exact, pHash or embeddings)"
DESCRIPTION = (
    "Compare every training image with the images of the eval sets and write DIR/keep.parquet (the uids "
    "of the training items that match none), DIR/report.json (per eval set: images found in the training "
    "data, training items removed, example pairs) and DIR/examples.png."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``decontaminate``."""
    add = parser.add_argument
    add_required(parser, "--shards", metavar="SPEC", help="training shards (semantic: the ones embedded)")
    add_required(parser, "--eval-set", action="append", metavar="ROOT",
                 help="an eval set (clip_benchmark layout, from data-tools eval-set) or an image folder; "
                 "repeat for several")  # fmt: skip
    add_required(parser, "--method", choices=METHODS, help="what counts as a duplicate")
    add_output(parser, "DIR|URL", "output folder or fsspec URL (s3://bucket/prefix)", url=True)
    add("--threshold", type=float_at_least(-1.0), metavar="T",
        help="perceptual: most pHash bits apart (10); semantic: least cosine similarity (0.95)")  # fmt: skip
    add(
        "--embeddings", metavar="DIR|URL", help="semantic: the training shards' embeddings (data-tools embed)"
    )
    add("--model", metavar="NAME|PATH", help="semantic: the model of --embeddings when it records none")
    add("--pretrained", metavar="TAG", help="semantic: open_clip pretrained tag of --model")
    add("--device", choices=("cpu", "cuda"), default="cpu", help="semantic: where eval images are embedded")
    add("--examples", type=int_at_least(0), default=10, metavar="N", help="example pairs per eval set")
    add_runner_args(parser)
    add_phase_args(parser, partitions=False)


def run(args: argparse.Namespace) -> None:
    """Decontaminate and print the totals."""
    from data_tools.decontam import DecontamConfig, decontaminate
    from data_tools.decontam.embedder import embedder_for
    from webshards.spec import expand_urls

    cfg = DecontamConfig(args.method, args.threshold, args.examples)
    embedder = None
    if args.method == "semantic":
        if args.embeddings is None:
            raise ValueError("--method semantic needs --embeddings DIR (from data-tools embed)")
        embedder = embedder_for(args.embeddings, args.model, args.pretrained, args.device)
    urls = expand_urls(args.shards)
    report = decontaminate(
        args.output, urls, args.eval_set, cfg, runner_options(args), args.embeddings, embedder
    )
    if report is None:
        print(f"decontaminate ({args.method}): this rank's tasks are done; rank 0 writes {args.output}")
        return
    found = ", ".join(f"{s['root']}: {s['images_in_training']}/{s['images']}" for s in report["eval_sets"])
    print(
        f"decontaminate ({args.method}): eval images in training {found}; removed "
        f"{report['removed']} of {report['items']} training items -> "
        f"{args.output}/keep.parquet ({report['seconds']:.1f} s)"
    )
