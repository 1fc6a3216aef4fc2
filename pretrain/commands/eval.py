"""`pretrain eval`: zero-shot classification / retrieval (and a validation loss) of a trained model."""

from __future__ import annotations

import argparse
import json
import sys

from pretrain.config import EvalConfig

HELP = "zero-shot classification / retrieval of a checkpoint, run directory or export"
DESCRIPTION = (
    "Evaluate on eval sets in clip_benchmark's webdataset layout; prints one JSON object per task "
    "(clip_benchmark's metric names). The task kind comes from ROOT/dataset_type.txt."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `eval`."""
    add = parser.add_argument
    add("--checkpoint", required=True, help="checkpoint folder, run directory, or export folder")
    add("--task", action="append", default=[], metavar="NAME=ROOT",
        help="an eval set: ROOT is a folder or s3:// / http(s):// URL in clip_benchmark's layout (repeatable)")  # fmt: skip
    add("--val-data", metavar="SPEC", help="held-out training-format shards: contrastive val loss")
    add("--zeroshot", metavar="ROOT", help="deprecated: the same as --task zeroshot=ROOT")
    add("--batch-size", type=int, default=EvalConfig.batch_size)
    add("--workers", type=int, default=EvalConfig.workers,
        help="data-loading worker processes (default: %(default)s)")  # fmt: skip
    add("--device", default="cpu", choices=["cpu", "cuda"])


def run(args: argparse.Namespace) -> None:
    """Evaluate; under torchrun every rank takes its share of each eval set and rank 0 prints."""
    import torch

    from pretrain.evaluation.tasks import parse_task, run_all
    from pretrain.models.build import load_trained
    from pretrain.parallel.distributed import detect, init_distributed, shutdown
    from pretrain.training.metrics import setup_logging

    tasks = [parse_task(t) for t in ([f"zeroshot={args.zeroshot}"] if args.zeroshot else []) + args.task]
    if not tasks and not args.val_data:
        raise ValueError("nothing to evaluate: give --task NAME=ROOT (repeatable) and/or --val-data SPEC")
    info = detect()
    setup_logging(info.is_main, stream=sys.stderr)  # progress lines; stdout is the results
    device = torch.device(f"cuda:{info.local_rank}" if args.device == "cuda" else "cpu")
    init_distributed(info, device)
    try:
        bundle = load_trained(args.checkpoint, device)
        split = info.world > 1
        results = run_all(
            bundle.model, bundle, tasks, args.val_data, device, args.batch_size, split, args.workers
        )
    finally:
        shutdown()
    if info.is_main:
        print("\n".join(json.dumps(result) for result in results), flush=True)
