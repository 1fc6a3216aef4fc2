"""`pretrain` command: train | config | eval | export. Thin: parse, dispatch."""

from __future__ import annotations

import json
import os
import sys

from pretrain.train import add_train_args, run
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

    ev = sub.add_parser("eval", help="zero-shot evaluation of a checkpoint, run directory or export")
    ev.add_argument("--checkpoint", required=True, help="checkpoint folder, run directory, or export folder")
    ev.add_argument(
        "--zeroshot", required=True, help="folder with classnames.txt, templates.txt and eval/ shards"
    )
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--device", default="cpu", choices=["cpu", "cuda"])

    ex = sub.add_parser("export", help="export a checkpoint to the open_clip hub layout")
    ex.add_argument("--checkpoint", required=True, help="checkpoint folder or run directory (its latest)")
    ex.add_argument("--output", required=True, help="folder to write (replaced atomically)")
    return parser


def _config(args) -> int:
    from pretrain.config import describe_config, load_config
    from pretrain.model import check_pretrained, resolve_model_name

    cfg = load_config(args.config, args.overrides)
    check_pretrained(resolve_model_name(cfg.model.name), cfg.model.pretrained)  # what train would refuse
    print("\n".join(describe_config(cfg)))
    return 0


def _eval(args) -> int:
    import torch

    from pretrain.evaluation.zeroshot import run_zeroshot
    from pretrain.model import load_trained

    device = torch.device(args.device)
    bundle = load_trained(args.checkpoint, device)
    print(
        json.dumps(
            {"eval": "zeroshot", **run_zeroshot(bundle.model, bundle, args.zeroshot, device, args.batch_size)}
        )
    )
    return 0


def _export(args) -> int:
    from pretrain.hub import export

    print(f"exported to {export(args.checkpoint, args.output)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return run(args.config, args.overrides)
    try:
        return {"config": _config, "eval": _eval, "export": _export}[args.command](args)
    except BrokenPipeError:  # `pretrain config | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"pretrain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
