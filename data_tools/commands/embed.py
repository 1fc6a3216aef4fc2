"""``embed``: CLIP image and text embeddings of shards, in the clip-retrieval layout."""

from __future__ import annotations

import argparse

from data_tools.commands.options import (
    add_output,
    add_required,
    add_runner_args,
    float_at_least,
    int_at_least,
    runner_options,
)
from data_tools.runner import RunSummary

HELP = "CLIP image/text embeddings and clip scores of shards (clip-retrieval layout)"
DESCRIPTION = (
    "Embed every sample with a CLIP model: img_emb/, text_emb/ (float16, L2-normalised) and "
    "metadata/ (key, uid, caption, clip_score), one file each per input shard. Resumable."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``embed``."""
    add = parser.add_argument
    add_required(parser, "--shards", metavar="SPEC", help="input shards")
    model_help = "open_clip name, export folder, checkpoint folder or run directory"
    add_required(parser, "--model", metavar="NAME|PATH", help=model_help)
    add_output(parser, "DIR|URL", "output folder or fsspec URL (s3://bucket/prefix)", url=True)
    add("--batch-size", type=int_at_least(1), default=256, metavar="N", help="samples per forward pass")
    add("--pretrained", metavar="TAG", help="open_clip pretrained tag (with an open_clip name)")
    add("--device", choices=("cpu", "cuda"), default="cpu", help="cuda runs under bf16 autocast")
    add("--ray-cpus-per-actor", type=float_at_least(0.01), default=1.0, metavar="N",
        help="--engine ray on CPU: CPUs (and torch threads) of each actor holding the model")  # fmt: skip
    add_runner_args(parser)


def run(args: argparse.Namespace) -> RunSummary:
    """Embed the shards and print where the embeddings are."""
    from data_tools.embed import EmbedConfig, embed_shards
    from webshards.spec import expand_urls

    cfg = EmbedConfig(args.model, args.pretrained, args.batch_size, args.device)
    urls = expand_urls(args.shards)
    summary = embed_shards(urls, args.output, cfg, runner_options(args), args.ray_cpus_per_actor)
    done = f"{summary.samples} samples embedded, {len(summary.skipped)} shards already done"
    print(f"embed: {done} -> {args.output}")
    return summary
