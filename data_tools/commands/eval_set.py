"""``eval-set``: an eval set in clip_benchmark's webdataset layout from an ImageFolder tree or a caption table."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_tools.commands.options import add_output, add_required, int_at_least

HELP = "write an eval set in clip_benchmark's webdataset layout (classification or retrieval)"
DESCRIPTION = (
    "From an ImageFolder tree (one sub-folder per class; ImageNet's WordNet-id tree gets open_clip's class "
    "names and OpenAI prompts) or a CSV/TSV/JSONL/parquet table of image paths and captions (rows of one "
    "image are several captions), write ROOT/classnames.txt, zeroshot_classification_templates.txt or "
    "dataset_type.txt, and ROOT/test/{0..N-1}.tar with nshards.txt written last. Reruns skip finished shards."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``eval-set``."""
    add_required(
        parser, "--input", type=Path, metavar="FOLDER_OR_TABLE", help="ImageFolder tree or caption table"
    )
    add_output(parser, metavar="ROOT", help="eval set folder")
    parser.add_argument(
        "--task", choices=("classification", "retrieval"), default=None,
        help="default: classification for a folder, retrieval for a table",
    )  # fmt: skip
    parser.add_argument("--samples-per-shard", type=int_at_least(1), default=5000, metavar="N")
    parser.add_argument("--workers", type=int_at_least(1), default=1, metavar="N", help="processes")


def run(args: argparse.Namespace):
    """Write the set; print one line about it when complete."""
    from data_tools.evalset import build_eval_set, describe

    summary = build_eval_set(args.input, args.output, args.task, args.samples_per_shard, args.workers)
    if summary.ok():
        print(describe(args.output))
    return summary
