"""`pretrain` command: train | config | eval | export | push | caption | plot. Thin: parse, dispatch."""

from __future__ import annotations

import json
import os
import sys

from pretrain.train import add_train_args, interrupted, run
from webshards.args import OneLineParser


def build_parser() -> OneLineParser:
    parser = OneLineParser(
        prog="pretrain", description="Contrastive image-text pretraining (CLIP) on open_clip."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_train_args(sub.add_parser("train", help="train a model from a YAML config"))
    add_train_args(
        sub.add_parser(
            "config",
            help="print the resolved config: every key, its value and what it means",
            description="Print the config `pretrain train` would run with (defaults <- --config FILE <- "
            "overrides), one `section.key: value  # meaning` line per key of the schema.",
        )
    )

    ev = sub.add_parser(
        "eval",
        help="zero-shot classification / retrieval of a checkpoint, run directory or export",
        description="Evaluate on eval sets in clip_benchmark's webdataset layout; prints one JSON object per "
        "task (clip_benchmark's metric names). The task kind comes from ROOT/dataset_type.txt.",
    )
    ev.add_argument("--checkpoint", required=True, help="checkpoint folder, run directory, or export folder")
    ev.add_argument(
        "--task", action="append", default=[], metavar="NAME=ROOT",
        help="an eval set: ROOT is a folder or s3:// / http(s):// URL in clip_benchmark's layout (repeatable)",
    )  # fmt: skip
    ev.add_argument(
        "--val-data", metavar="SPEC", help="held-out training-format shards: contrastive val loss"
    )
    ev.add_argument("--zeroshot", metavar="ROOT", help="deprecated: the same as --task zeroshot=ROOT")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    ev.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    ex = sub.add_parser("export", help="export a checkpoint to the open_clip hub layout")
    ex.add_argument("--checkpoint", required=True, help="checkpoint folder or run directory (its latest)")
    ex.add_argument("--output", required=True, help="folder to write (replaced atomically)")
    ex.add_argument(
        "--weights",
        choices=["final", "ensemble"],
        default="final",
        help="final: the checkpoint's weights (default); ensemble: its running weight average "
        "(train.weight_ensemble_every)",
    )
    add_push_args(sub.add_parser("push", help="publish an export to the Hugging Face Hub or an fsspec store"))
    add_caption_args(
        sub.add_parser(
            "caption", help="caption images with a CoCa checkpoint (open_clip generate's decoding)"
        )
    )
    add_plot_args(sub.add_parser("plot", help="draw a run's metrics.jsonl as curves.png"))
    return parser


def add_push_args(parser) -> None:
    parser.description = (
        "Upload an export folder (`pretrain export`) to a Hugging Face Hub model repo (endpoint: HF_ENDPOINT, "
        "token: HF_TOKEN or the saved login) or under any fsspec URL, a _COMPLETE marker written last."
    )
    parser.add_argument(
        "--export", required=True, metavar="DIR", help="export folder (`pretrain export --output`)"
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo-id", metavar="ORG/NAME", help="Hub model repo (created if absent)")
    target.add_argument(
        "--to", metavar="URL", help="fsspec URL, e.g. s3://bucket/prefix (s3: AWS_ENDPOINT_URL)"
    )
    parser.add_argument("--revision", help="Hub branch to commit to, created if absent (default: main)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument(
        "--dry-run", action="store_true", help="list the files, sizes and target; upload nothing"
    )


def add_plot_args(parser) -> None:
    parser.description = (
        "Draw loss (and its parts), lr, samples/s, data wait and every eval metric against the step, "
        "one panel each, from RUN_DIR/metrics.jsonl."
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    parser.add_argument("--output", metavar="PNG", help="image to write (default: RUN_DIR/curves.png)")


def _plot(args) -> int:
    from pretrain.training.plot import plot_run

    path, titles = plot_run(args.run_dir, args.output)
    print(f"wrote {path} ({len(titles)} panels: {', '.join(titles)})")
    return 0


def add_caption_args(parser) -> None:
    from pretrain.generate.decoding import METHODS, DecodingConfig

    d = DecodingConfig()
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint folder, run directory, or export folder"
    )
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", nargs="+", metavar="FILE", help="image files (lines carry their path)")
    inputs.add_argument("--shards", metavar="SPEC", help="WebDataset shards, e.g. 'data/{00000..00009}.tar'")
    parser.add_argument("--decoding", choices=METHODS, default=d.method, help="default: %(default)s")
    parser.add_argument(
        "--max-length", type=int, default=d.max_length,
        help="most tokens per caption, start/end tokens included (default: %(default)s, as open_clip generate)",
    )  # fmt: skip
    parser.add_argument("--min-length", type=int, default=d.min_length, help="default: %(default)s")
    parser.add_argument("--num-beams", type=int, default=d.num_beams, help="default: %(default)s")
    parser.add_argument("--num-beam-groups", type=int, default=d.num_beam_groups, help="default: %(default)s")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="default: %(default)s")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="default: %(default)s")
    parser.add_argument(
        "--temperature", type=float, default=d.temperature, help="sampling; default: %(default)s"
    )
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    parser.add_argument("--seed", type=int, default=0, help="torch seed for sampling (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output", help="JSON lines file to write (default: standard output)")


def _caption(args) -> int:
    from pretrain.generate.caption import write_captions
    from pretrain.generate.decoding import DecodingConfig
    from pretrain.training.metrics import setup_logging

    setup_logging(is_main=True, stream=sys.stderr)  # progress lines; stdout may be the captions

    config = DecodingConfig(
        method=args.decoding, max_length=args.max_length, min_length=args.min_length,
        num_beams=args.num_beams, num_beam_groups=args.num_beam_groups, top_k=args.top_k, top_p=args.top_p,
        temperature=args.temperature, repetition_penalty=args.repetition_penalty,
    )  # fmt: skip
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
    return 0


def _config(args) -> int:
    from pretrain.config import describe_config, load_config
    from pretrain.models.build import check_pretrained, resolve_model_name

    cfg = load_config(args.config, args.overrides)
    check_pretrained(resolve_model_name(cfg.model.name), cfg.model.pretrained)  # what train would refuse
    print("\n".join(describe_config(cfg)))
    return 0


def _eval(args) -> int:
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
        split = info.world_size > 1
        results = run_all(
            bundle.model, bundle, tasks, args.val_data, device, args.batch_size, split, args.workers
        )
    finally:
        shutdown()
    if info.is_main:
        print("\n".join(json.dumps(result) for result in results), flush=True)
    return 0


def _push(args) -> int:
    from pretrain.publish.push import push_to_hub, push_to_url

    if args.to and (args.revision or args.private):
        raise ValueError("--revision and --private apply to --repo-id only, not --to")
    if args.to:
        lines = push_to_url(args.export, args.to, args.dry_run)
    else:
        lines = push_to_hub(args.export, args.repo_id, args.revision, args.private, args.dry_run)
    print("\n".join(lines))
    return 0


def _export(args) -> int:
    from pretrain.publish.export import export

    print(f"exported to {export(args.checkpoint, args.output, args.weights)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _command(args)
    except KeyboardInterrupt:
        return interrupted()


def _command(args) -> int:
    if args.command == "train":
        return run(args.config, args.overrides)
    try:
        commands = {
            "config": _config,
            "eval": _eval,
            "export": _export,
            "caption": _caption,
            "push": _push,
            "plot": _plot,
        }
        return commands[args.command](args)
    except BrokenPipeError:  # `pretrain config | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"pretrain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
