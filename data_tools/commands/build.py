"""``build``: image folder or table of paths/URLs -> shards in the img2dataset layout."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_tools.commands.options import (
    add_output,
    add_required,
    add_runner_args,
    float_at_least,
    int_at_least,
    runner_options,
)
from data_tools.images import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, RESIZE_MODES, ImageConfig
from data_tools.inputs import MISSING_CAPTION
from data_tools.runner import RunSummary

HELP = "build WebDataset shards from an image folder or a table of paths/URLs with captions"
DESCRIPTION = (
    "Fetch, resize and write images with captions as img2dataset-layout shards. Resumable; "
    "rows go to shards by row order, so the output does not depend on --workers or nodes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``build``."""
    add = parser.add_argument
    add_required(parser, "--input", type=Path, metavar="PATH", help="folder or CSV/TSV/JSONL/parquet")
    add_output(parser, "DIR|URL", "output folder or fsspec URL (s3://bucket/prefix)", url=True)
    add("--samples-per-shard", type=int_at_least(1), default=10000, metavar="N", help="input rows per shard")
    add("--image-size", type=int_at_least(1), default=256, metavar="N", help="target side in pixels")
    add("--resize-mode", choices=RESIZE_MODES, default="keep_ratio", help="as img2dataset")
    add("--jpeg-quality", type=int_at_least(1), default=95, metavar="Q", help="quality of re-encoded JPEGs")
    add("--max-aspect-ratio", type=float_at_least(1.0), metavar="R", help="reject more elongated images")
    add("--url-col", metavar="C", help="table column with URLs or paths (default: url/path/image/...)")
    add("--caption-col", metavar="C",
        help="table column with captions (default: caption/text/title); a column of lists: several captions")  # fmt: skip
    add("--separator", type=one_character, metavar="S",
        help="a CSV/TSV table's separator, '\\t' for a tab (default: a tab for .tsv, else a comma)")  # fmt: skip
    add("--threads", type=int_at_least(1), default=8, metavar="N", help="images fetched at once per worker")
    add("--timeout", type=float_at_least(0.1), default=10.0, metavar="S", help="seconds per URL download")
    add("--retries", type=int_at_least(0), default=2, metavar="N", help="retries of a failed download")
    add("--max-image-bytes", type=int_at_least(1), default=MAX_IMAGE_BYTES, metavar="N",
        help="stop a download past N bytes (32 MiB): failed_to_download")  # fmt: skip
    add("--max-image-pixels", type=int_at_least(1), default=MAX_IMAGE_PIXELS, metavar="N",
        help="refuse an image declaring more pixels (PIL's limit): failed_to_decode")  # fmt: skip
    add("--missing-caption", choices=MISSING_CAPTION, default="skip",
        help="an image without a caption: skip it (status missing_caption) or keep it with an empty caption")  # fmt: skip
    add_runner_args(parser)


def one_character(text: str) -> str:
    """An argparse type for ``--separator``: one character, or ``\\t`` / ``tab`` for a tab."""
    text = "\t" if text in ("\\t", "tab") else text
    if len(text) != 1:
        raise argparse.ArgumentTypeError(f"expected one character, got {text!r}")
    return text


def run(args: argparse.Namespace) -> RunSummary:
    """Build shards and print where they are, with the input rows counted by status."""
    from data_tools.build import FetchConfig, build
    from webshards.outputs import describe_shards, status_counts

    image = ImageConfig(args.image_size, args.resize_mode, args.jpeg_quality, args.max_aspect_ratio)
    fetching = FetchConfig(
        args.threads, args.timeout, args.retries, args.max_image_bytes, args.max_image_pixels
    )
    summary = build(
        args.input,
        args.output,
        args.samples_per_shard,
        image,
        fetching,
        args.url_col,
        args.caption_col,
        runner_options(args),
        missing_caption=args.missing_caption,
        separator=args.separator,
    )
    print(f"build: {describe_shards(args.output)}")
    counts = status_counts(args.output)
    shown = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    print(f"build: {sum(counts.values())} input rows: {shown or 'none'}")
    return summary
